//! Cost of choosing a backend: `Balancer::pick` for each algorithm over 3 and 100 backends
//! (all available, no retries), and the cold-path cost of building a Maglev table.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard::backend::Backend;
use switchyard::balance::{Algorithm, Balancer, DEFAULT_MAGLEV_TABLE_SIZE};
use switchyard::hash::hash64;

const ALGORITHMS: [Algorithm; 4] = [
    Algorithm::RoundRobin,
    Algorithm::LeastConn,
    Algorithm::Maglev,
    Algorithm::RandomTwo,
];

/// `count` backends with weights 1..=4 repeating, each holding a few connections so least
/// connections and random-two compare real loads.
fn pool(count: usize) -> (Vec<Backend>, Vec<switchyard::backend::ActiveGuard>) {
    let backends: Vec<Backend> = (0..count)
        .map(|i| {
            let addr =
                SocketAddr::from((Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250) as u8), 5432));
            Backend::new(&format!("backend-{i}"), addr, (i % 4) as u32 + 1)
        })
        .collect();
    let guards = backends
        .iter()
        .enumerate()
        .flat_map(|(i, b)| (0..i % 7).map(move |_| b.state.connection_opened()))
        .collect();
    (backends, guards)
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for count in [3, 100] {
        let (backends, _guards) = pool(count);
        for algorithm in ALGORITHMS {
            let balancer = Balancer::build(algorithm, &backends, DEFAULT_MAGLEV_TABLE_SIZE);
            let mut client = 0u64;
            group.bench_function(BenchmarkId::new(algorithm.name(), count), |b| {
                b.iter(|| {
                    client = client.wrapping_add(1);
                    let key = hash64(&client.to_be_bytes());
                    black_box(balancer.pick(black_box(&backends), key, &[], 1))
                })
            });
        }
    }
    group.finish();
}

fn maglev_build(c: &mut Criterion) {
    let (backends, _guards) = pool(100);
    c.bench_function("maglev_build/100_backends/65537", |b| {
        b.iter(|| {
            Balancer::build(
                Algorithm::Maglev,
                black_box(&backends),
                DEFAULT_MAGLEV_TABLE_SIZE,
            )
        })
    });
}

criterion_group!(benches, pick, maglev_build);
criterion_main!(benches);
