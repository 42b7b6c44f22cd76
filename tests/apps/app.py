#!/usr/bin/env python3
"""A plain application for Mycel's end-to-end tests: nothing in it knows about the mesh.

  app.py serve PORT [LOG]         HTTP server on [::]:PORT (dual stack). GET /blob/N answers N
                                  deterministic bytes; GET /whoami answers the client address;
                                  any other connection that sends "ping\n" gets "pong\n".
                                  With LOG, appends each accepted connection's peer to that file.
  app.py get URL                  HTTP GET with http.client; prints JSON {peer, status, len, sha256}
  app.py probe HOST PORT [kill] [mark=N]
                                  connect (and with "kill", ask the server to reset the
                                  connection; with mark=N, with SO_MARK N on the socket), wait
                                  for data; prints JSON {outcome, seconds}
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
  app.py rawsyn V4 V6 PORT OPEN   hand-made TCP SYNs (raw sockets) to V4/V6: whole, in tiny or
                                  overlapping IPv4 fragments, behind IPv6 extension headers or
                                  in IPv6 fragments; to PORT, and as controls whole or behind a
                                  hop-by-hop header to OPEN. Prints {answered, silent}: the
                                  cases that got a SYN-ACK back and those that did not
  app.py forge SRC SPORT DST DPORT  hand-made TCP segments (IPv4 or IPv6) with a forged source SRC:SPORT
                                  (raw socket): a SYN, an ACK with data and a RST, each with
                                  made-up sequence numbers; prints {sent}
  app.py tunsyn PORT OPEN [NAME]  makes a tun interface NAME (hex; default "mtun0") in this
                                  netns (as an application with CAP_NET_ADMIN could), brings it
                                  up, then injects SYNs to PORT and OPEN through it; prints
                                  {answered, silent, up} (up: whether it was still up then)
  app.py ident PORT NAME SECS     server that sends "NAME\n" on each connection, then holds it
                                  SECS seconds (or until the client closes) and closes it
  app.py tally HOST PORT N C TIMEOUT SLOW
                                  N connections, C at a time, each reads the server's name and
                                  waits for its close; prints {counts (by name), failures,
                                  errors (by kind), slow (seconds to the name, those over SLOW)}
  app.py blob-sha256 N            the sha256 of the N bytes GET /blob/N answers (no network)
"""
import hashlib
import http.client
import http.server
import json
import os
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


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def tcp_syn(src, dst, sport, dport, v6):
    """A 20-byte TCP SYN header with its checksum for the src/dst addresses (bytes)."""
    header = struct.pack("!HHIIBBHHH", sport, dport, 12345, 0, 5 << 4, 0x02, 65535, 0, 0)
    if v6:
        pseudo = src + dst + struct.pack("!IxxxB", len(header), 6)
    else:
        pseudo = src + dst + struct.pack("!xBH", 6, len(header))
    return header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]


def ipv4_packet(src, dst, ident, frag, payload):
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, frag, 64, 6, 0,
                         src, dst)
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def ipv6_packet(src, dst, next_header, payload):
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64, src, dst) + payload


def tcp_segment(src, dst, sport, dport, flags, seq, payload, v6):
    """A TCP segment (20-byte header, then `payload`) with its checksum for src/dst (bytes)."""
    header = struct.pack("!HHIIBBHHH", sport, dport, seq, seq ^ 0x5A5A5A5A, 5 << 4, flags,
                         65535, 0, 0)
    length = len(header) + len(payload)
    if v6:
        pseudo = src + dst + struct.pack("!IxxxB", length, 6)
    else:
        pseudo = src + dst + struct.pack("!xBH", 6, length)
    sum_ = checksum(pseudo + header + payload)
    return header[:16] + struct.pack("!H", sum_) + header[18:] + payload


def forge(src, sport, dst, dport):
    v6 = ":" in dst
    family = socket.AF_INET6 if v6 else socket.AF_INET
    src_b, dst_b = socket.inet_pton(family, src), socket.inet_pton(family, dst)
    sent = 0
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        for ident, (flags, payload) in enumerate([(0x02, b""), (0x18, b"forged\n"), (0x04, b"")]):
            segment = tcp_segment(src_b, dst_b, sport, dport, flags, 1000003 * (ident + 1),
                                  payload, v6)
            if v6:
                packet = ipv6_packet(src_b, dst_b, 6, segment)
            else:
                packet = ipv4_packet(src_b, dst_b, 0x4d00 + ident, 0, segment)
            raw.sendto(packet, (dst, 0))
            sent += 1
    print(json.dumps({"sent": sent}))


def local_address(host, family):
    with socket.socket(family, socket.SOCK_DGRAM) as u:
        u.connect((host, 9))
        return u.getsockname()[0]


# Source ports of the raw SYN cases: below the kernel's ephemeral range, so that no
# connection the pod's own kernel makes (other attacks, in the siege) can use one of them and
# have its SYN-ACK taken for a case's answer.
RAWSYN_FIRST_PORT = 19000


def rawsyn(v4, v6, port, open_port):
    """Sends each case from its own source port and listens for SYN-ACKs back: from the
    case's destination address and port, to its source port."""
    src4 = socket.inet_pton(socket.AF_INET, local_address(v4, socket.AF_INET))
    dst4 = socket.inet_pton(socket.AF_INET, v4)
    src6 = socket.inet_pton(socket.AF_INET6, local_address(v6, socket.AF_INET6))
    dst6 = socket.inet_pton(socket.AF_INET6, v6)
    send4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    send6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    recv4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    recv6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    cases = {}
    packets = []

    def v4_case(name, dport, fragments):
        sport = RAWSYN_FIRST_PORT + len(cases)
        cases[sport] = (name, dst4, dport)
        segment = tcp_syn(src4, dst4, sport, dport, False)
        for offset, more, size in fragments:
            part = segment[offset * 8: offset * 8 + size] if size else segment[offset * 8:]
            frag = (0x2000 if more else 0) | offset
            packets.append((send4, ipv4_packet(src4, dst4, sport, frag, part), v4))

    def v6_case(name, dport, wrap):
        sport = RAWSYN_FIRST_PORT + len(cases)
        cases[sport] = (name, dst6, dport)
        segment = tcp_syn(src6, dst6, sport, dport, True)
        for next_header, payload in wrap(segment, sport):
            packets.append((send6, ipv6_packet(src6, dst6, next_header, payload), v6))

    def hop_by_hop(segment, _):
        return [(0, bytes([6, 0, 1, 4, 0, 0, 0, 0]) + segment)]

    def dest_options(segment, _):
        return [(60, bytes([6, 0, 1, 4, 0, 0, 0, 0]) + segment)]

    def fragments(segment, ident):
        first, rest = segment[:16], segment[16:]
        return [(44, struct.pack("!BBHI", 6, 0, 0 | 1, ident) + first),
                (44, struct.pack("!BBHI", 6, 0, 2 << 3, ident) + rest)]

    v4_case("v4 whole SYN to the open port (control)", open_port, [(0, False, 0)])
    v4_case("v4 whole SYN", port, [(0, False, 0)])
    # RFC 1858: the first fragment holds 8 bytes of TCP (no flags), the second the rest.
    v4_case("v4 tiny fragments", port, [(0, True, 8), (1, False, 0)])
    v4_case("v4 two fragments to the open port", open_port, [(0, True, 8), (1, False, 0)])
    v6_case("v6 whole SYN to the open port (control)", open_port, lambda s, _: [(6, s)])
    v6_case("v6 hop-by-hop to the open port (control)", open_port, hop_by_hop)
    v6_case("v6 whole SYN", port, lambda s, _: [(6, s)])
    v6_case("v6 hop-by-hop", port, hop_by_hop)
    v6_case("v6 destination options", port, dest_options)
    v6_case("v6 fragments", port, fragments)

    for sock in (recv4, recv6):
        sock.setblocking(False)
    names = {name for name, _, _ in cases.values()}
    controls = {n for n in names if "(control)" in n}
    answered = set()
    # A path just made may lose the first packets while neighbours are resolved: send again
    # (the same SYNs: retransmissions) until the controls are answered, three rounds at most.
    for _ in range(3):
        for sock, packet, host in packets:
            sock.sendto(packet, (host, 0))
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            # Everything queued: a raw socket sees all of the pod's TCP, which in the siege
            # is a lot, and what is not read in time is dropped.
            for sock, v6_sock, family in [(recv4, False, socket.AF_INET),
                                          (recv6, True, socket.AF_INET6)]:
                while True:
                    try:
                        data, (source, *_) = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    tcp = data if v6_sock else data[(data[0] & 0x0F) * 4:]
                    if len(tcp) < 14:
                        continue
                    sport, dport = struct.unpack("!HH", tcp[0:4])
                    case = cases.get(dport)
                    source = socket.inet_pton(family, source)
                    if case and (source, sport) == case[1:] and tcp[13] & 0x12 == 0x12:
                        answered.add(case[0])
            time.sleep(0.01)
        if controls <= answered:
            break
    print(json.dumps({"answered": sorted(answered),
                      "silent": sorted(names - answered)}))


def tunsyn(port, open_port, name=b"mtun0"):
    import fcntl
    TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
    SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK = 0x8913, 0x8914, 0x8916, 0x891C
    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", name, IFF_TUN | IFF_NO_PI))
    # Address and up with ioctls: `ip` cannot take every name a device can have.
    ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    def sockaddr(ip):
        return struct.pack("HH4s8x", socket.AF_INET, 0, socket.inet_aton(ip))
    fcntl.ioctl(ctl, SIOCSIFADDR, struct.pack("16s16s", name, sockaddr("192.168.77.1")))
    fcntl.ioctl(ctl, SIOCSIFNETMASK, struct.pack("16s16s", name, sockaddr("255.255.255.252")))
    flags = struct.unpack("16sH", fcntl.ioctl(ctl, SIOCGIFFLAGS, struct.pack("16sH", name, 0)))[1]
    fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH", name, flags | 1))
    # Time for the node to notice the new interface.
    time.sleep(1.5)
    flags = struct.unpack("16sH", fcntl.ioctl(ctl, SIOCGIFFLAGS, struct.pack("16sH", name, 0)))[1]
    up = bool(flags & 1)
    local = socket.inet_pton(socket.AF_INET, "192.168.77.1")
    peer = socket.inet_pton(socket.AF_INET, "192.168.77.2")
    cases = {42001: "open port", 42002: "application port"}
    for sport, dport in [(42001, open_port), (42002, port)]:
        try:
            os.write(tun, ipv4_packet(peer, local, sport, 0, tcp_syn(peer, local, sport, dport, False)))
        except OSError:
            pass  # a device set down takes nothing
    answered = set()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            data = os.read(tun, 65535)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if len(data) < 40 or data[0] >> 4 != 4 or data[9] != 6:
            continue
        tcp = data[(data[0] & 0x0F) * 4:]
        dport = struct.unpack("!H", tcp[2:4])[0]
        if dport in cases and tcp[13] & 0x12 == 0x12:
            answered.add(cases[dport])
    os.close(tun)
    print(json.dumps({"answered": sorted(answered),
                      "silent": sorted(set(cases.values()) - answered), "up": up}))


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


def probe(host, port, kill=False, mark=None):
    start = time.monotonic()
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(5)
    if mark is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
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


def ident(port, name, hold_seconds):
    """Says its name to each client, then holds the connection `hold_seconds` (or until the
    client closes) and closes it: a server whose connections last as long as it decides."""
    import threading

    def one(conn):
        with conn:
            try:
                conn.sendall(name.encode() + b"\n")
                conn.settimeout(hold_seconds)
                while conn.recv(4096):
                    pass
            except OSError:
                pass

    with socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True,
                              backlog=1024) as srv:
        print("listening", flush=True)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()


def tally(host, port, n, concurrency, timeout, slow_above):
    """Opens `n` connections, `concurrency` at a time; each reads the server's name and waits
    for its close. Counts connections by name, failures by error, and lists how long the
    connections that took over `slow_above` seconds to get their name took."""
    import collections
    import threading
    counts, errors, slow = collections.Counter(), collections.Counter(), []
    lock = threading.Lock()
    left = [n]

    def one():
        start = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=timeout) as s:
                got = b""
                while not got.endswith(b"\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        raise ConnectionError("closed before the name")
                    got += chunk
                took = time.monotonic() - start
                while s.recv(4096):
                    pass
            with lock:
                counts[got.decode().strip()] += 1
                if took > slow_above and len(slow) < 1000:
                    slow.append(round(took, 4))
        except OSError as e:
            with lock:
                errors[type(e).__name__] += 1

    def worker():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            one()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"counts": counts, "failures": sum(errors.values()), "errors": errors,
                      "slow": sorted(slow)}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "serve":
        serve(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
    elif mode == "get":
        get(sys.argv[2])
    elif mode == "probe":
        marks = [int(a[5:], 0) for a in sys.argv[4:] if a.startswith("mark=")]
        probe(sys.argv[2], int(sys.argv[3]), "kill" in sys.argv[4:], marks[0] if marks else None)
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
    elif mode == "forge":
        forge(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    elif mode == "rawsyn":
        rawsyn(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "tunsyn":
        name = bytes.fromhex(sys.argv[4]) if len(sys.argv) > 4 else b"mtun0"
        tunsyn(int(sys.argv[2]), int(sys.argv[3]), name)
    elif mode == "ident":
        ident(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]))
    elif mode == "tally":
        tally(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
              float(sys.argv[6]), float(sys.argv[7]))
    elif mode == "blob-sha256":
        print(json.dumps({"sha256": hashlib.sha256(blob(int(sys.argv[2]))).hexdigest()}))
    else:
        sys.exit(f"unknown mode {mode}")
