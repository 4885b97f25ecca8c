//! Maps key paths (`pools[0].backends[1].address`) to their line and column in the YAML
//! text, so validation errors found after deserialization still point at the source.
//! serde_yaml does not expose spans, so the text is walked once more with yaml-rust2's
//! event parser, which does. Only used on the config path, never at runtime.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Positions (1-based line, 1-based column) of every node, by key path.
#[derive(Debug, Default)]
pub struct Locations {
    by_path: HashMap<String, (usize, usize)>,
}

impl Locations {
    /// Indexes `text`; a text that does not parse yields an empty index (serde_yaml reports
    /// the syntax error itself, with its own location).
    pub fn index(text: &str) -> Locations {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut walker, false).is_err() {
            return Locations::default();
        }
        Locations {
            by_path: walker.by_path,
        }
    }

    /// Position of exactly `path`.
    pub fn exact(&self, path: &str) -> Option<(usize, usize)> {
        self.by_path.get(path).copied()
    }

    /// Position of `path`, or of its nearest ancestor that has one.
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut path = path;
        loop {
            if let Some(pos) = self.by_path.get(path) {
                return Some(*pos);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }
}

enum Frame {
    Mapping { key: Option<String> },
    Sequence { index: usize },
}

#[derive(Default)]
struct Walker {
    stack: Vec<(Frame, String)>,
    by_path: HashMap<String, (usize, usize)>,
}

impl Walker {
    /// The path of the node that starts now, or None when it is a mapping key.
    fn node_path(&mut self, event: &Event) -> Option<String> {
        let Some((frame, parent)) = self.stack.last_mut() else {
            return Some(String::new());
        };
        match frame {
            Frame::Mapping { key } => match key.take() {
                None => {
                    *key = Some(match event {
                        Event::Scalar(text, ..) => text.clone(),
                        _ => String::from("?"),
                    });
                    None
                }
                Some(k) if parent.is_empty() => Some(k),
                Some(k) => Some(format!("{parent}.{k}")),
            },
            Frame::Sequence { index } => {
                let path = format!("{parent}[{index}]");
                *index += 1;
                Some(path)
            }
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, event: Event, mark: Marker) {
        match event {
            Event::Scalar(..) | Event::Alias(_) => {
                if let Some(path) = self.node_path(&event) {
                    self.by_path.insert(path, (mark.line(), mark.col() + 1));
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = self.node_path(&event).unwrap_or_default();
                self.by_path
                    .entry(path.clone())
                    .or_insert((mark.line(), mark.col() + 1));
                let frame = match event {
                    Event::MappingStart(..) => Frame::Mapping { key: None },
                    _ => Frame::Sequence { index: 0 },
                };
                self.stack.push((frame, path));
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys() {
        let text = "listeners:\n  - name: app\n    bind: 1.2.3.4:5\npools:\n  - name: p\n    backends:\n      - address: x\n";
        let loc = Locations::index(text);
        assert_eq!(loc.find("listeners[0].name"), Some((2, 11)));
        assert_eq!(loc.find("listeners[0].bind"), Some((3, 11)));
        assert_eq!(loc.find("pools[0].backends[0].address"), Some((7, 18)));
        // A missing key falls back to its parent.
        assert_eq!(loc.find("pools[0].balance"), loc.find("pools[0]"));
    }

    #[test]
    fn flow_style_and_bad_yaml() {
        let loc = Locations::index("pools: [{name: a, backends: [{address: b}]}]\n");
        assert_eq!(loc.find("pools[0].backends[0].address"), Some((1, 40)));
        assert!(Locations::index("a: [").find("a").is_none());
    }
}
