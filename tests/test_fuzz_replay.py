"""Mutated captures through ``replay`` (issue 10): whatever the bytes, the only
failure is the project's one-line error (:class:`~iqn_ctl.errors.IqnError`).

Small valid pcap/pcapng seeds of every variant are mutated by a seeded RNG:
bit flips, bytes set to boundary values, truncation, splices of two seeds, and
writes aimed at the fields a reader trusts (record and block lengths,
timestamps, if_tsresol/if_tsoffset, the byte-order magic). Each mutant goes
through the same entry the CLI calls (``replay_capture``); any exception other
than an ``IqnError`` fails the test with the mutant's seed and bytes. A sample
also goes through the real ``iqn-ctl replay`` subprocess.

The mutant count is ``IQN_FUZZ_CAPTURES`` (default :data:`CAPTURES`); the test
stops early at its time budget ``IQN_FUZZ_BUDGET`` seconds (default
:data:`BUDGET`) and prints the count actually run and the rate, so CI's run
time stays bounded on a slow or shared machine.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from iqn_ctl.capture.frames import udp_frame
from iqn_ctl.capture.pcapwrite import (
    Interface,
    Packet,
    block,
    pcapng_section_bytes,
    write_pcap,
    write_pcapng,
)
from iqn_ctl.engine.params import CandidateFilter, SignalParams
from iqn_ctl.errors import IqnError
from iqn_ctl.evaluate.replay import replay_capture

#: mutants per run (the issue's 1,000,000), unless the time budget ends it first
CAPTURES = int(os.environ.get("IQN_FUZZ_CAPTURES", "1000000"))
#: seconds the in-process fuzz may take
BUDGET = float(os.environ.get("IQN_FUZZ_BUDGET", "480"))
#: mutants that must run even on a slow machine, or the fuzz proved nothing
MIN_CAPTURES = 20_000
#: mutants also run through the real command line
CLI_SAMPLE = 40
T0 = 1_700_000_000.0
INTERESTING32 = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                 11, 12, 13, 15, 16, 27, 28, 31, 32, 999_999, 1_000_000, 999_999_999, 1_000_000_000,
                 262_144, 262_145)  # fmt: skip


def _packets(rnd: random.Random, count: int) -> list[Packet]:
    out = []
    t = T0
    for i in range(count):
        t += rnd.choice((0.01, 0.05, 0.2, 1.5))
        v6 = i % 3 == 0
        src, dst = ("2001:db8::10", "2001:db8:1::2") if v6 else ("198.18.0.10", "198.18.1.2")
        size = rnd.choice((1180, 1200, 1288, 1300, 200))
        port = rnd.choice((443, 443, 443, 8443))
        vlans = rnd.choice(((), (), (5,), (5, 6)))
        frame = udp_frame(src, dst, port, 50000 + i % 3, size, vlans=vlans)
        out.append(Packet(t, frame[: rnd.choice((len(frame), len(frame), 120, 40))], orig_len=len(frame)))
    return out


def seeds(tmp: Path) -> list[bytes]:
    """Small valid captures of every variant the reader knows."""
    rnd = random.Random(11)
    out = []
    p = tmp / "seed"
    for kw in ({}, {"nanos": True}, {"big_endian": True}, {"nanos": True, "big_endian": True}):
        write_pcap(p, _packets(rnd, 12), **kw)  # type: ignore[arg-type]
        out.append(p.read_bytes())
    for kw2 in (
        {},
        {"big_endian": True},
        {"interfaces": (Interface(tsresol=None),)},
        {"interfaces": (Interface(tsresol=0x80 | 20, tsoffset=int(T0) // 2),)},
        {"interfaces": (Interface(), Interface(tsresol=6))},
        {"simple": True},
        {"extra": block(0x0BAD, b"custom block")},
    ):
        write_pcapng(p, _packets(rnd, 12), **kw2)  # type: ignore[arg-type]
        out.append(p.read_bytes())
    # two sections of opposite byte order
    le, be = _packets(rnd, 6), _packets(rnd, 6)
    out.append(pcapng_section_bytes(le) + pcapng_section_bytes(be, big_endian=True))
    return out


def _fields(data: bytes) -> list[tuple[int, str]]:
    """Offsets and byte orders of the 32-bit fields a reader trusts."""
    out: list[tuple[int, str]] = []
    if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        e = "<" if data[0] in (0xD4, 0x4D) else ">"
        out += [(20, e), (4, e)]
        off = 24
        while off + 16 <= len(data):
            out += [(off, e), (off + 4, e), (off + 8, e), (off + 12, e)]
            off += 16 + struct.unpack_from(e + "I", data, off + 8)[0]
        return out
    off = 0
    e = "<"
    while off + 12 <= len(data):
        btype = struct.unpack_from("<I", data, off)[0]
        if btype == 0x0A0D0D0A:
            e = "<" if data[off + 8 : off + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            out.append((off + 8, e))
        blen = struct.unpack_from(e + "I", data, off + 4)[0]
        out += [(off, e), (off + 4, e), (off + 8, e), (off + 12, e), (off + 16, e), (off + 20, e),
                (off + 24, e), (off + blen - 4, e)]  # fmt: skip
        if blen < 12:
            break
        off += blen
    return [(o, e) for o, e in out if 0 <= o <= len(data) - 4]


def mutate(rnd: random.Random, pool: list[bytes], fields: list[list[tuple[int, str]]]) -> bytes:
    k = rnd.randrange(len(pool))
    data = bytearray(pool[k])
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(10)
        if not data:
            break
        if op < 3:  # bit flip
            i = rnd.randrange(len(data) * 8)
            data[i >> 3] ^= 1 << (i & 7)
        elif op < 5:  # a byte to a boundary value
            data[rnd.randrange(len(data))] = rnd.choice((0, 1, 0x7F, 0x80, 0xFE, 0xFF, 0x0A, 0x0D))
        elif op < 8 and fields[k]:  # a trusted field to a boundary value, or nudged
            off, e = rnd.choice(fields[k])
            if off + 4 <= len(data):
                if rnd.random() < 0.6:
                    v = rnd.choice(INTERESTING32)
                else:
                    v = struct.unpack_from(e + "I", data, off)[0] + rnd.choice((-4, -1, 1, 4, 64))
                    v &= 0xFFFFFFFF
                struct.pack_into(e + "I", data, off, v)
        elif op == 8:  # truncate
            del data[rnd.randrange(len(data)) :]
        else:  # splice: a head of this one, a tail of another
            other = pool[rnd.randrange(len(pool))]
            data = data[: rnd.randrange(len(data) + 1)] + other[rnd.randrange(len(other)) :]
    return bytes(data)


def fuzz_worker(job: tuple[int, int, float, str]) -> tuple[int, dict[str, int], str | None, float]:
    """Run up to ``count`` mutants from ``seed`` within ``budget`` seconds in
    directory ``where``: (mutants run, outcomes, the first failure or None, seconds)."""
    seed, count, budget, where = job
    tmp = Path(where)
    pool = seeds(tmp)
    fields = [_fields(s) for s in pool]
    params, filt = SignalParams(), CandidateFilter()
    path = tmp / "mutant.cap"
    outcomes: Counter[str] = Counter()
    rnd = random.Random(seed)
    start = time.monotonic()
    done = 0
    while done < count:
        data = mutate(rnd, pool, fields)
        done += 1
        # a new file each time: truncating one that was just mapped costs ~0.7 ms
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        notes: list[str] = []
        try:
            replay_capture(path, params, "count", filt, warn=notes.append)
            outcomes["read, warned" if notes else "read"] += 1
        except IqnError as e:
            msg = str(e)
            if not msg.startswith(f"{path}: ") or "\n" in msg:
                return done, dict(outcomes), f"mutant {done} of seed {seed}: not one line: {msg!r}", 0.0
            outcomes[msg.split(": ", 2)[1].split(" at byte")[0].split(" (")[0][:40]] += 1
        except Exception as e:  # a bug: keep the mutant to reproduce it
            keep = tmp / f"crash-{seed}-{done}.cap"
            keep.write_bytes(data)
            return done, dict(outcomes), (
                f"mutant {done} of seed {seed} ({keep}, {len(data)} bytes) raised {type(e).__name__}: {e}"
            ), 0.0
        if done % 1024 == 0 and time.monotonic() - start > budget:
            break
    return done, dict(outcomes), None, time.monotonic() - start


def test_a_million_mutated_captures_give_only_one_line_errors(tmp_path: Path) -> None:
    """Split over the machine's cores (at most 2): each worker its own seed and directory."""
    workers = max(1, min(2, os.cpu_count() or 1))
    jobs = []
    for w in range(workers):
        d = tmp_path / f"w{w}"
        d.mkdir()
        share = CAPTURES // workers + (1 if w < CAPTURES % workers else 0)
        jobs.append((20251202 + w, share, BUDGET, str(d)))
    start = time.monotonic()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        results = pool.map(fuzz_worker, jobs)
    took = time.monotonic() - start
    failures = [f for _, _, f, _ in results if f]
    assert not failures, failures[0]
    done = sum(r[0] for r in results)
    outcomes: Counter[str] = Counter()
    for r in results:
        outcomes.update(r[1])
    print(f"\nfuzz: {done} mutated captures in {took:.1f} s with {workers} worker(s) "
          f"({done / took:.0f}/s, budget {BUDGET:.0f} s, asked {CAPTURES}); "
          f"outcomes: {dict(outcomes.most_common(12))}")  # fmt: skip
    assert done >= min(CAPTURES, MIN_CAPTURES), f"only {done} mutants in {took:.0f} s"
    # the mutants reach both sides: readable captures and several kinds of error
    assert outcomes["read"] + outcomes["read, warned"] > done // 20, outcomes
    assert len(outcomes) >= 8, outcomes


def test_mutants_through_the_command_line_end_in_one_line(tmp_path: Path) -> None:
    pool = seeds(tmp_path)
    fields = [_fields(s) for s in pool]
    rnd = random.Random(7)
    codes: Counter[int] = Counter()
    for i in range(CLI_SAMPLE):
        path = tmp_path / f"m{i}.cap"
        path.write_bytes(mutate(rnd, pool, fields))
        r = subprocess.run([sys.executable, "-m", "iqn_ctl", "replay", str(path)], capture_output=True,
                           text=True, timeout=60)  # fmt: skip
        codes[r.returncode] += 1
        assert "Traceback" not in r.stderr, r.stderr
        assert r.returncode in (0, 2), (r.returncode, r.stderr)
        if r.returncode == 2:
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"iqn-ctl: error: {path}: "), r.stderr
        else:
            assert r.stdout.strip(), r.stderr
            assert all(line.startswith("iqn-ctl: ") for line in r.stderr.splitlines()), r.stderr
    assert codes[0] and codes[2], codes  # the sample reached both outcomes
