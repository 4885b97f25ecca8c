"""A MongoDB replica-set member played by mockupdb (the MongoDB Python driver team's
wire-protocol test server), for Switchyard's mongodb health-check tests.

Usage: mongo_mock.py ROLE [--legacy] [--tls]
  ROLE: primary | secondary | arbiter
  --legacy: answer `hello` with CommandNotFound, as servers before 4.4.2 do; only the
            legacy `isMaster` works.
  --tls:    speak only TLS (mockupdb's own test certificate), as a member with
            net.tls.mode requireTLS does.
As real servers do, a `hello` reply says `isWritablePrimary` and an `isMaster` reply says
`ismaster` (servers before 4.4.2 know no `isWritablePrimary` at all), with `helloOk` from
servers that know `hello`.
Prints "port N" once listening. Then reads commands from stdin, one per line:
  primary | secondary | arbiter   switch the role and print "ok"
  stats                           print "hello=N ismaster=M" (commands answered so far)
Exits when stdin closes.
"""
import sys
import threading

from mockupdb import MockupDB

SET_NAME = "rs0"


def main():
    state = {"role": sys.argv[1], "legacy": "--legacy" in sys.argv[2:], "hello": 0, "ismaster": 0}
    lock = threading.Lock()
    server = MockupDB(port=None, ssl="--tls" in sys.argv[2:])

    def describe(role, primary_field):
        doc = {
            primary_field: role == "primary",
            "secondary": role == "secondary",
            "setName": SET_NAME,
            "hosts": ["localhost:%d" % server.port],
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "maxBsonObjectSize": 16777216,
            "maxMessageSizeBytes": 48000000,
            "maxWriteBatchSize": 100000,
            "logicalSessionTimeoutMinutes": 30,
        }
        if role == "arbiter":
            doc["arbiterOnly"] = True
        return doc

    def handle(request):
        name = (request.command_name or "").lower()
        with lock:
            role, legacy = state["role"], state["legacy"]
            if name == "hello":
                state["hello"] += 1
            elif name == "ismaster":
                state["ismaster"] += 1
        if name == "hello":
            if legacy:
                return request.command_err(code=59, errmsg="no such command: 'hello'")
            return request.ok(**describe(role, "isWritablePrimary"))
        if name == "ismaster":
            hello_ok = {} if legacy else {"helloOk": True}
            return request.ok(**hello_ok, **describe(role, "ismaster"))
        return request.ok()

    server.autoresponds(handle)
    server.run()
    print("port %d" % server.port, flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd in ("primary", "secondary", "arbiter"):
            with lock:
                state["role"] = cmd
            print("ok", flush=True)
        elif cmd == "stats":
            with lock:
                print("hello=%d ismaster=%d" % (state["hello"], state["ismaster"]), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
