import socket, subprocess, sys, os, time, threading, hashlib
out = sys.argv[1]
def capture(cmd, pg=False, name=None):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0)); s.listen(1); port = s.getsockname()[1]
    args = [a.replace("PORT", str(port)) for a in cmd]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, PGCONNECT_TIMEOUT="3"))
    s.settimeout(5)
    c, _ = s.accept(); c.settimeout(2)
    data = b""
    if pg:
        req = c.recv(8)
        c.sendall(b"S")
    try:
        while len(data) < 20000:
            chunk = c.recv(65536)
            if not chunk: break
            data += chunk
            # stop once a whole first record plus any following records are in
            if len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"): 
                time.sleep(0.2)
                try:
                    c.setblocking(False); data += c.recv(65536)
                except Exception: pass
                break
    except Exception: pass
    c.close(); s.close(); p.kill(); p.wait()
    fn = os.path.join(out, name)
    open(fn, "wb").write(data)
    print(name, len(data))
ssl = ["openssl", "s_client", "-connect", "127.0.0.1:PORT"]
capture(ssl + ["-servername", "db.example.com", "-alpn", "h2,http/1.1"], name="openssl-tls13-sni-alpn")
capture(ssl + ["-servername", "api.example.com", "-tls1_2"], name="openssl-tls12-sni")
capture(ssl + ["-noservername"], name="openssl-no-sni")
capture(ssl + ["-servername", "x.example.com", "-tls1_2", "-no_ticket", "-cipher", "ALL"], name="openssl-tls12-many-ciphers")
capture(["psql", "host=db.example.com hostaddr=127.0.0.1 port=PORT sslmode=require user=postgres"], pg=True, name="psql15-after-sslrequest")
capture(["curl", "-s", "--resolve", "api.example.com:PORT:127.0.0.1", "https://api.example.com:PORT/"], name="curl-sni")
capture(ssl + ["-servername", "pg.example.com", "-alpn", "postgresql"], name="openssl-direct-tls-postgresql-alpn")

# The same handshake bytes re-split into 16-byte records.
data = open(os.path.join(out, "openssl-tls13-sni-alpn"), "rb").read()
n = int.from_bytes(data[3:5], "big")
payload = data[5:5 + n]
split = b"".join(b"\x16\x03\x01" + len(payload[i:i+16]).to_bytes(2, "big") + payload[i:i+16] for i in range(0, len(payload), 16))
open(os.path.join(out, "split-16-byte-records"), "wb").write(split)
print("split-16-byte-records", len(split))
