#!/usr/bin/env python3
"""Baseline for mailroom's probe benchmark: the same test sequence with Python's
imaplib / poplib (login, STATUS or STAT, logout), in N worker processes. Prints one JSON
line: tests, seconds of wall time, and client CPU seconds (user + system, all workers)."""

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


def worker(args, count, out):
    ctx = ssl.create_default_context(cafile=args.ca)
    test = {"imap": one_imap, "imap-starttls": one_imap_starttls, "pop3": one_pop3}[args.protocol]
    for _ in range(count):
        test(args, ctx)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put(ru.ru_utime + ru.ru_stime)


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
    out = multiprocessing.Queue()
    start = time.monotonic()
    procs = [multiprocessing.Process(target=worker, args=(args, per, out)) for _ in range(args.workers)]
    for pr in procs:
        pr.start()
    cpu = sum(out.get() for _ in procs)
    for pr in procs:
        pr.join()
    wall = time.monotonic() - start
    print(json.dumps({"tests": per * args.workers, "wall_s": wall, "cpu_s": cpu}))


if __name__ == "__main__":
    main()
