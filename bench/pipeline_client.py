#!/usr/bin/env python3
"""One connection's pipeline: N copies of a simple Query sent at once, all answers read.

usage: pipeline_client.py PORT N SQL [STALL]

Logs in as `postgres` (trust), then a writer thread sends N Query messages of SQL in one go
while this thread reads, after STALL seconds of reading nothing (a client that pipelines
without reading its answers), until N ReadyForQuery have arrived. Prints the seconds from the
first byte sent to the last answer.
"""
import socket
import struct
import sys
import threading
import time


def message(tag, body):
    return tag + struct.pack("!I", len(body) + 4) + body


def login(port):
    s = socket.create_connection(("127.0.0.1", port))
    params = b"user\0postgres\0database\0postgres\0\0"
    body = struct.pack("!I", 3 << 16) + params
    s.sendall(struct.pack("!I", len(body) + 4) + body)
    buf = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("closed during login")
        buf += chunk
        while len(buf) >= 5:
            tag, length = buf[:1], struct.unpack("!I", buf[1:5])[0]
            if len(buf) < 1 + length:
                break
            if tag == b"E":
                sys.exit("login refused: %r" % buf[5 : 1 + length])
            if tag == b"Z":
                return s
            buf = buf[1 + length :]


def main():
    port, n, sql = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
    stall = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    s = login(port)
    pipeline = message(b"Q", sql + b"\0") * n
    started = time.monotonic()
    threading.Thread(target=s.sendall, args=(pipeline,), daemon=True).start()
    time.sleep(stall)
    # ReadyForQuery (idle) is 6 fixed bytes; a split one is caught by keeping the tail.
    ready, seen, tail = b"Z\0\0\0\x05I", 0, b""
    while seen < n:
        chunk = s.recv(1 << 20)
        if not chunk:
            sys.exit("closed after %d answers" % seen)
        data = tail + chunk
        seen += data.count(ready)
        tail = data[-5:]
    print("%.3f" % (time.monotonic() - started))


if __name__ == "__main__":
    main()
