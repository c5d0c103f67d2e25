"""On a GPU: a decode layer's four projections as Triton products against cuBLAS, and a whole layer with
programmatic dependent launch (PDL), at the benchmark's 128 rows (16 prompts x 8 completions).

    python benchmarks/decode_products.py [--model 360m|1.7b] [--wide]

At 128 rows each cuBLAS product takes a fixed ~5 us whatever its size (docs/benchmarks.md). With PDL a kernel starts
while the one before it finishes: a product reads nothing its predecessor writes until ``gdc_wait``, so it can pull
its weights into L2 first (``prefetch``). Prints each projection's cuBLAS time and the best Triton tile shapes (of
a wider sweep with ``--wide``), then a layer's seven launches at decode step 128 through cuBLAS and the kernels of
rlreason.rollout.triton_decode, through Triton products, with PDL, and with PDL and the prefetch, each layer of its own
weights and caches as in the step; every variant's residual stream is checked against the cuBLAS layer's.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from benchmarks.decode_kernels import time_us  # noqa: E402
from benchmarks.workload import SHAPES  # noqa: E402
from rlreason.rollout import triton_decode as K  # noqa: E402

TILES = {"block_m": (32, 64, 128), "block_n": (16, 32, 64), "block_k": (64, 128), "num_warps": (4,),
         "num_stages": (3, 4)}
WIDE = {"block_m": (32, 64, 128), "block_n": (16, 32, 64), "block_k": (64, 128, 256), "num_warps": (4, 8),
        "num_stages": (2, 3, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="360m", choices=("360m", "1.7b"))
    parser.add_argument("--wide", action="store_true", help="a wider sweep of tile shapes")
    args = parser.parse_args()
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    shape = SHAPES[args.model]
    hidden, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    H, Hkv, D, P, G, Wp, Wc = shape["num_attention_heads"], shape["num_key_value_heads"], 64, 16, 8, 64, 256
    R = P * G

    def weights_of(rows: int, cols: int) -> list[torch.Tensor]:
        return [torch.randn(rows, cols, device=dev, dtype=dt) * cols**-0.5 for _ in range(layers)]

    weights = {"qkv": weights_of((H + 2 * Hkv) * D, hidden), "o": weights_of(hidden, H * D),
               "gate_up": weights_of(2 * inter, hidden), "down": weights_of(hidden, inter)}
    inputs = {"qkv": torch.randn(R, hidden, device=dev, dtype=dt), "o": torch.randn(R, H * D, device=dev, dtype=dt),
              "gate_up": torch.randn(R, hidden, device=dev, dtype=dt), "down": torch.randn(R, inter, device=dev, dtype=dt)}
    residual = torch.randn(R, hidden, device=dev, dtype=dt)

    def per_layer(fn) -> float:
        return time_us(lambda: [fn(i) for i in range(layers)], reps=4) / layers

    best = {}
    grid = WIDE if args.wide else TILES
    for name, ws in weights.items():
        adds = name in ("o", "down")
        x = inputs[name]
        if adds:
            cublas = per_layer(lambda i, ws=ws, x=x: residual.addmm_(x, ws[i].t()))
        else:
            cublas = per_layer(lambda i, ws=ws, x=x: F.linear(x, ws[i]))
        rows = []
        for values in itertools.product(*grid.values()):
            launch = dict(zip(grid, values, strict=True))
            out = residual if adds else None
            try:
                us = per_layer(lambda i, ws=ws, x=x, out=out, launch=launch: K.linear(x, ws[i], out, **launch))
            except Exception as error:  # a tile too large for the chip's shared memory, say
                print(f"  {name} {launch}: {type(error).__name__}", flush=True)
                continue
            rows.append((us, launch))
        rows.sort(key=lambda row: row[0])
        best[name] = rows[0][1]
        expected = F.linear(x, ws[0]).float()
        error = (K.linear(x, ws[0], **best[name]).float() - expected).abs().max().item() / expected.abs().max().item()
        print(f"projection {name} {tuple(ws[0].shape)}{' added in place' if adds else ''}: cuBLAS {cublas:.1f} us; "
              f"Triton best {rows[0][0]:.1f} us at {rows[0][1]} (max error {error:.1e} of the largest output)")
        for us, launch in rows[1:4]:
            print(f"    then {us:.1f} us at {launch}")

    kp, vp = (torch.randn(layers, P, Hkv, Wp, D, device=dev, dtype=dt) for _ in range(2))
    kc, vc = (torch.randn(layers, P, Hkv, G, Wc, D, device=dev, dtype=dt) for _ in range(2))
    bias = torch.zeros(P, Wp, device=dev)
    cos, sin = torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt), torch.randn(Wp + Wc + 1, D, device=dev, dtype=dt)
    pos0, t = torch.full((R,), Wp, device=dev), torch.tensor(128, device=dev)

    def layer(i: int, x: torch.Tensor, products: str, pdl: bool = False, prefetch: bool = False) -> None:
        def project(h, name, out=None):
            w = weights[name][i]
            if products == "cublas":
                return F.linear(h, w) if out is None else out.addmm_(h, w.t())
            return K.linear(h, w, out, pdl=pdl, prefetch=prefetch, **best[name])

        q = K.rope_and_cache(project(x, "qkv"), x, None, cos, sin, pos0, t, kc[i], vc[i], None, None, 1e-5, H, Hkv, D,
                             G, pdl=pdl)
        project(K.decode_attention(q, kp[i], vp[i], bias, kc[i], vc[i], t, G, pdl=pdl), "o", x)
        project(K.silu_mul(project(x, "gate_up"), x, None, 1e-5, pdl=pdl), "down", x)

    start = torch.randn(R, hidden, device=dev, dtype=dt)
    variants = {"cuBLAS + 3 kernels": dict(products="cublas"), "Triton products": dict(products="triton"),
                "Triton, PDL": dict(products="triton", pdl=True),
                "Triton, PDL + L2 prefetch": dict(products="triton", pdl=True, prefetch=True)}
    reference = None
    print(f"one layer, 7 launches (Triton {triton.__version__}), at decode step 128 ({layers} layers of their own weights and caches)")
    for label, variant in variants.items():
        x = start.clone()
        try:
            for i in range(layers):
                layer(i, x, **variant)
        except Exception as error:  # PDL needs a Hopper GPU and a Triton that launches with it
            print(f"  {label}: {type(error).__name__}: {error}", flush=True)
            continue
        if reference is None:
            reference = x.float()
        error = (x.float() - reference).abs().max().item() / reference.abs().max().item()
        stream = torch.randn(R, hidden, device=dev, dtype=dt)
        us = per_layer(lambda i, variant=variant, stream=stream: layer(i, stream, **variant))
        print(f"  {label}: {us:.1f} us a layer (after {layers} layers the stream is within {error:.1e} of cuBLAS's)",
              flush=True)


if __name__ == "__main__":
    main()
