#!/usr/bin/env python3
"""Baseline for mailroom's probe benchmark: the same test sequence with Python's
imaplib / poplib (login, STATUS or STAT, logout), in N worker processes. Prints one JSON
line: tests, seconds of wall time, and client CPU seconds (user + system, all workers).

Each worker first runs one test that is not counted (mailroom's side is warmed up too),
then measures its own loop: its CPU from getrusage before and after, so a forked
worker's start (copy-on-write faults of the interpreter's heap, the TLS context) is not
charged to the tests; and the wall time from the first worker's start of its loop to the
last one's end."""

import argparse
import imaplib
import json
import multiprocessing
import poplib
import resource
import ssl
import time


def one_imap(args, ctx):
    c = imaplib.IMAP4_SSL(args.host, args.port, ssl_context=ctx)
    c.login(args.user, args.password)
    typ, _ = c.status("INBOX", "(MESSAGES UNSEEN)")
    assert typ == "OK"
    c.logout()


def one_imap_starttls(args, ctx):
    c = imaplib.IMAP4(args.host, args.port)
    c.starttls(ssl_context=ctx)
    c.login(args.user, args.password)
    typ, _ = c.status("INBOX", "(MESSAGES UNSEEN)")
    assert typ == "OK"
    c.logout()


def one_pop3(args, ctx):
    c = poplib.POP3_SSL(args.host, args.port, context=ctx)
    c.user(args.user)
    c.pass_(args.password)
    c.stat()
    c.quit()


def cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def worker(args, count, ready, go, out):
    ctx = ssl.create_default_context(cafile=args.ca)
    test = {"imap": one_imap, "imap-starttls": one_imap_starttls, "pop3": one_pop3}[args.protocol]
    test(args, ctx)
    ready.put(None)
    go.wait()
    cpu0, start = cpu(), time.monotonic()
    for _ in range(count):
        test(args, ctx)
    out.put((cpu() - cpu0, start, time.monotonic()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--protocol", choices=["imap", "imap-starttls", "pop3"], required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--tests", type=int, default=200)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    per = args.tests // args.workers
    ready, go, out = multiprocessing.Queue(), multiprocessing.Event(), multiprocessing.Queue()
    procs = [
        multiprocessing.Process(target=worker, args=(args, per, ready, go, out))
        for _ in range(args.workers)
    ]
    for pr in procs:
        pr.start()
    # Every worker warmed up before any starts its loop, as mailroom's tasks start together.
    for _ in procs:
        ready.get()
    go.set()
    results = [out.get() for _ in procs]
    for pr in procs:
        pr.join()
    wall = max(r[2] for r in results) - min(r[1] for r in results)
    print(json.dumps({
        "tests": per * args.workers,
        "wall_s": wall,
        "cpu_s": sum(r[0] for r in results),
    }))


if __name__ == "__main__":
    main()
