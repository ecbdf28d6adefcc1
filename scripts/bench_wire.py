#!/usr/bin/env python3
"""Wire-path throughput for one ResNet-18-sized update (11.7M float32 parameters, 62 tensors).

Measures, as medians after warm-up: codec encode, seal (encode excluded) for N recipients,
seal_frame (encode + seal streamed from the tensors, what a node runs), open_envelope for one
recipient, open_in_place (a fresh copy of the message opened in place, copy included), codec
decode, decode + check_against, and a memcpy baseline of the same bytes taken in the same run. Prints a table, then one JSON line (the last line).

    python scripts/bench_wire.py [--reps 9] [--recipients 4] [--chunk-mib 4] [--aead aes256gcm]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from p2pfl import codec
from p2pfl import envelope as E
from p2pfl.federation import FederationAuthority
from p2pfl.identity import Identity


def resnet18_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet18 (weights and biases, no BN running stats)."""
    shapes: dict[str, tuple[int, ...]] = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.weight": (64,),
        "bn1.bias": (64,),
    }
    cin = 64
    for layer, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            p = f"layer{layer}.{block}"
            first_in = cin if block == 0 else cout
            shapes[f"{p}.conv1.weight"] = (cout, first_in, 3, 3)
            shapes[f"{p}.bn1.weight"] = (cout,)
            shapes[f"{p}.bn1.bias"] = (cout,)
            shapes[f"{p}.conv2.weight"] = (cout, cout, 3, 3)
            shapes[f"{p}.bn2.weight"] = (cout,)
            shapes[f"{p}.bn2.bias"] = (cout,)
            if block == 0 and first_in != cout:
                shapes[f"{p}.downsample.0.weight"] = (cout, first_in, 1, 1)
                shapes[f"{p}.downsample.1.weight"] = (cout,)
                shapes[f"{p}.downsample.1.bias"] = (cout,)
        cin = cout
    shapes["fc.weight"] = (num_classes, 512)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def median_s(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--recipients", type=int, default=4)
    ap.add_argument("--chunk-mib", type=float, default=E.CHUNK_BYTES / (1 << 20))
    ap.add_argument("--aead", choices=[E.AES, E.XCHACHA], default=E.DEFAULT_AEAD)
    args = ap.parse_args()
    E.CHUNK_BYTES = int(args.chunk_mib * (1 << 20))
    E.DEFAULT_AEAD = args.aead

    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in resnet18_shapes().items()}
    n_params = sum(a.size for a in params.values())

    sender = Identity.generate()
    readers = [Identity.generate() for _ in range(args.recipients)]
    with tempfile.TemporaryDirectory() as tmp:
        auth = FederationAuthority.create(Path(tmp) / "fed")
        certs = {
            i.node_id: auth.issue(f"n{k}", i.verify_key_bytes, i.box_public_bytes, ttl_s=3600)
            for k, i in enumerate([sender, *readers])
        }
        root = auth.root
    recipients = {r.node_id: r.box_public_bytes for r in readers}
    seq = iter(range(1, 1 << 30))

    def meta() -> E.UpdateMeta:
        return E.UpdateMeta(
            sender=sender.node_id,
            federation=root.federation_id,
            round=1,
            seq=next(seq),
            timestamp=time.time(),
            samples=1000,
            degree=4,
        )

    payload = codec.encode(params)
    message = E.seal(payload, meta(), sender, recipients)
    opened_meta, plaintext = E.open_envelope(
        message, readers[0], root, certs.get, E.ReplayGuard(), max_bytes=len(message)
    )
    assert plaintext == payload
    spec = codec.spec_of(params)
    nbytes = len(payload)
    scratch = np.empty(nbytes, np.uint8)
    src = np.frombuffer(payload, np.uint8)

    ops: dict[str, Callable[[], object]] = {
        "memcpy": lambda: bytearray(payload),  # fresh buffer, like every step below
        "memcpy_warm": lambda: np.copyto(scratch, src),  # into an already-mapped buffer
        "encode": lambda: codec.encode(params),
        "seal": lambda: E.seal(payload, meta(), sender, recipients),
        # what RoundCore.pack runs: encode + seal in one pass, chunk by chunk from the tensors
        "seal_frame": lambda: E.seal(codec.frame(params), meta(), sender, recipients),
        "open": lambda: E.open_envelope(
            message, readers[0], root, certs.get, E.ReplayGuard(), max_bytes=len(message)
        ),
        # what a received update gets: a fresh Owned copy of the message (as reassembly leaves
        # it; this copy is timed too) opened in place
        "open_in_place": lambda: E.open_envelope(
            E.Owned.of(message),
            readers[0],
            root,
            certs.get,
            E.ReplayGuard(),
            max_bytes=len(message),
            in_place=True,
        ),
        "decode": lambda: codec.decode(plaintext),
        "decode_check": lambda: codec.check_against(codec.decode(plaintext), spec),
    }
    secs = {name: median_s(fn, args.reps) for name, fn in ops.items()}
    gbps = {name: nbytes / s / 1e9 for name, s in secs.items()}

    print(
        f"ResNet-18-sized update: {n_params:,} float32 params in {len(params)} tensors, "
        f"{nbytes / 1e6:.1f} MB frame, {len(message) / 1e6:.1f} MB sealed for {args.recipients} recipients"
    )
    print(
        f"AEAD {E.DEFAULT_AEAD}, chunk {E.CHUNK_BYTES / (1 << 20):g} MiB, "
        f"{os.cpu_count()} CPUs, median of {args.reps} after warm-up"
    )
    print(f"{'step':<14}{'ms':>9}{'GB/s':>9}{'vs memcpy':>11}")
    for name in ops:
        print(f"{name:<14}{secs[name] * 1e3:>9.1f}{gbps[name]:>9.2f}{gbps[name] / gbps['memcpy']:>10.2f}x")
    result = {
        "bytes": nbytes,
        "message_bytes": len(message),
        "tensors": len(params),
        "recipients": args.recipients,
        "aead": E.DEFAULT_AEAD,
        "chunk_bytes": E.CHUNK_BYTES,
        "cpus": os.cpu_count(),
        "reps": args.reps,
    }
    for name in ops:
        result[f"{name}_ms"] = round(secs[name] * 1e3, 2)
        result[f"{name}_gbps"] = round(gbps[name], 3)
    result["seal_frame_vs_encode_plus_seal"] = round(secs["seal_frame"] / (secs["encode"] + secs["seal"]), 3)
    for name in ("encode", "seal", "seal_frame", "open", "open_in_place", "decode"):
        result[f"{name}_vs_memcpy"] = round(gbps[name] / gbps["memcpy"], 3)
    sys.stdout.flush()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
