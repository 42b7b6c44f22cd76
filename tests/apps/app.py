#!/usr/bin/env python3
"""A plain application for Mycel's end-to-end tests: nothing in it knows about the mesh.

  app.py serve PORT [LOG]         HTTP server on [::]:PORT (dual stack). GET /blob/N answers N
                                  deterministic bytes; GET /whoami answers the client address;
                                  any other connection that sends "ping\n" gets "pong\n".
                                  With LOG, appends each accepted connection's peer to that file.
  app.py get URL                  HTTP GET with http.client; prints JSON {peer, status, len, sha256}
  app.py probe HOST PORT [kill]   connect (and with "kill", ask the server to reset the
                                  connection), wait for data; prints JSON {outcome, seconds}
                                  (outcome: reset | eof | data | timeout | refused | eperm)
  app.py halfclose HOST PORT N    send N bytes to the echo server, shut down writing, read the
                                  echo until EOF; prints {sent, received, same}
  app.py loop HOST PORT N         N sequential connections, each "ping" -> "pong"; prints failures
  app.py hold HOST PORT N         N connections open at once, then "ping" on each; prints {ok, failed}
  app.py linger HOST PORT SECS    one connection kept open SECS seconds, a line echoed every 0.5 s
                                  (server side: a connection that starts with "echo\n");
                                  prints {rounds, failed, error}
  app.py greet PORT LOG           server that speaks first, as SMTP does: on each connection,
                                  appends the peer to LOG, sends GREETING and closes at once
  app.py read HOST PORT N         N sequential connections, each read to its end; prints
                                  {connections, complete, outcomes} (complete: got all of GREETING)
  app.py stall HOST PORT HEX N SECS  N connections, each sends the bytes HEX and then nothing for
                                  SECS seconds; prints {opened, closed_by_peer, refused}
  app.py blob-sha256 N            the sha256 of the N bytes GET /blob/N answers (no network)
"""
import hashlib
import http.client
import http.server
import json
import socket
import socketserver
import struct
import sys
import time


def blob(n):
    # Deterministic, not compressible-looking: a repeating 251-byte pattern (prime length).
    pattern = bytes((i * 37 + 11) % 256 for i in range(251))
    reps, rest = divmod(n, len(pattern))
    return pattern * reps + pattern[:rest]


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/blob/"):
            body = blob(int(self.path[len("/blob/"):]))
        elif self.path == "/whoami":
            host = self.client_address[0]
            body = (host[len("::ffff:"):] if host.startswith("::ffff:") else host).encode()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    accept_log = None

    def verify_request(self, request, client_address):
        if self.accept_log:
            with open(self.accept_log, "a") as f:
                f.write(client_address[0] + "\n")
        return True

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def finish_request(self, request, client_address):
        # "ping" connections (the loop mode) are answered without HTTP.
        first = request.recv(5, socket.MSG_PEEK)
        if first == b"ping\n":
            request.recv(5)
            request.sendall(b"pong\n")
            return
        if first == b"kill\n":
            # Close with RST: linger on, zero timeout.
            request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.close()
            return
        if first == b"echo\n":
            request.recv(5)
            while True:
                data = request.recv(65536)
                if not data:
                    return
                request.sendall(data)
        super().finish_request(request, client_address)


# What `greet` sends: a line, then enough bytes that they are more than one small segment.
GREETING = b"220 greeter ESMTP ready\r\n" + blob(3000)


def greet(port, accept_log):
    with socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True,
                              backlog=128) as srv:
        print("listening", flush=True)
        while True:
            conn, peer = srv.accept()
            with conn:
                with open(accept_log, "a") as f:
                    f.write(peer[0] + "\n")
                conn.sendall(GREETING)


def read(host, port, n):
    outcomes = []
    for _ in range(n):
        got = bytearray()
        try:
            with socket.create_connection((host, port), timeout=10) as s:
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            outcomes.append("complete" if bytes(got) == GREETING else "short %d" % len(got))
        except OSError as e:
            outcomes.append("%s after %d bytes" % (type(e).__name__, len(got)))
    print(json.dumps({"connections": n, "complete": outcomes.count("complete"),
                      "outcomes": outcomes}))


def stall(host, port, data, n, seconds):
    socks, refused = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(data)
            s.setblocking(False)
            socks.append(s)
        except OSError:
            refused += 1
    time.sleep(seconds)
    closed = 0
    for s in socks:
        try:
            if s.recv(65536) == b"":
                closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    print(json.dumps({"opened": len(socks), "closed_by_peer": closed, "refused": refused}))


def serve(port, accept_log=None):
    with Server(("::", port), Handler) as srv:
        srv.accept_log = accept_log
        print("listening", flush=True)
        srv.serve_forever()


def get(url):
    assert url.startswith("http://")
    hostport, _, path = url[len("http://"):].partition("/")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.connect()
    peer = conn.sock.getpeername()
    conn.request("GET", "/" + path)
    resp = conn.getresponse()
    body = resp.read()
    print(json.dumps({
        "peer": [peer[0], peer[1]],
        "status": resp.status,
        "len": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "body": body.decode(errors="replace") if len(body) < 200 else None,
    }))


def probe(host, port, kill=False):
    start = time.monotonic()
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(5)
    try:
        s.connect((host, port))
        if kill:
            s.sendall(b"kill\n")
        data = s.recv(1)
        outcome = "data" if data else "eof"
    except ConnectionRefusedError:
        outcome = "refused"
    except PermissionError:
        # connect() refused locally, e.g. by a cgroup connect hook.
        outcome = "eperm"
    except ConnectionResetError:
        outcome = "reset"
    except socket.timeout:
        outcome = "timeout"
    print(json.dumps({"outcome": outcome, "seconds": time.monotonic() - start}))


def loop(host, port, n):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    failures = 0
    for _ in range(n):
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"ping\n")
                if s.recv(5) != b"pong\n":
                    failures += 1
        except OSError:
            failures += 1
    print(json.dumps({"connections": n, "failures": failures}))


def hold(host, port, n):
    socks, results = [], []
    for _ in range(n):
        try:
            socks.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            # On loopback a reset can arrive before connect() returns: a failed connection.
            results.append(False)
    for s in socks:
        try:
            s.sendall(b"ping\n")
            results.append(s.recv(5) == b"pong\n")
        except OSError:
            results.append(False)
    print(json.dumps({"ok": sum(results), "failed": len(results) - sum(results)}))


def halfclose(host, port, n):
    data = blob(n)
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"echo\n" + data)
        s.shutdown(socket.SHUT_WR)
        got = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    print(json.dumps({"sent": n, "received": len(got), "same": bytes(got) == data}))


def linger(host, port, seconds):
    rounds, failed, error = 0, 0, None
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"echo\n")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                line = ("round %d\n" % rounds).encode()
                s.sendall(line)
                got = b""
                while len(got) < len(line):
                    chunk = s.recv(len(line) - len(got))
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                rounds += 1
                if got != line:
                    failed += 1
                time.sleep(0.5)
    except OSError as e:
        error = repr(e)
    print(json.dumps({"rounds": rounds, "failed": failed, "error": error}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    elif mode == "get":
        get(sys.argv[2])
    elif mode == "probe":
        probe(sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["kill"])
    elif mode == "halfclose":
        halfclose(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "hold":
        hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "loop":
        loop(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "linger":
        linger(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    elif mode == "greet":
        greet(int(sys.argv[2]), sys.argv[3])
    elif mode == "read":
        read(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "stall":
        stall(sys.argv[2], int(sys.argv[3]), bytes.fromhex(sys.argv[4]), int(sys.argv[5]),
              float(sys.argv[6]))
    elif mode == "blob-sha256":
        print(json.dumps({"sha256": hashlib.sha256(blob(int(sys.argv[2]))).hexdigest()}))
    else:
        sys.exit(f"unknown mode {mode}")
