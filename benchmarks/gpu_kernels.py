"""GPU kernel benchmarks, each against its PyTorch baseline in the same run.

1. Attention: ``kernels.attention.prefill_attention`` (our Triton FlashAttention-2 kernel) against
   ``F.scaled_dot_product_attention`` restricted to PyTorch's flash backend, causal, bfloat16,
   head sizes 64 and 128, sequences of 1k to 8k tokens, about ``--tokens`` tokens per batch and
   ``--model-dim / head_dim`` heads (as in Triton's fused-attention tutorial). TFLOP/s counts the
   causal half of the two matmuls: 4 * B * H * L * L * D / 2.
2. Dense attention: ``kernels.attention.dense_attention`` (the kernel diffusers denoisers use with
   ``attention: genserve``) against ``F.scaled_dot_product_attention`` with PyTorch's own backend
   choice, no mask, bfloat16, at the shapes of an SDXL-class UNet with classifier-free guidance
   (batch 2, 10 or 20 heads of 64, self-attention over 32x32 and 64x64 latents and cross-attention
   to 77 text tokens). TFLOP/s counts both matmuls: 4 * B * H * Lq * Lk * D.
3. Decode: greedy decode tokens/s of a 1B-class Llama (``models.llama.model``, random weights) at
   batch 1 and 32, in bfloat16 and again after ``quantize_linears_int8`` and
   ``quantize_linears_int4`` (every linear, lm_head included), through the model's
   ``forward(input_ids, cache)`` and ``new_cache``.

Needs a CUDA GPU and Triton::

    .venv/bin/python benchmarks/gpu_kernels.py
    .venv/bin/python benchmarks/gpu_kernels.py --part attention --seq-lens 1024,2048
    .venv/bin/python benchmarks/gpu_kernels.py --part dense
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # genserve from this checkout, installed or not

DEVICE = torch.device("cuda")
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["attention", "dense", "decode", "all"], default="all")
    p.add_argument("--seq-lens", type=int_list, default=[1024, 2048, 4096, 8192])
    p.add_argument("--head-dims", type=int_list, default=[64, 128])
    p.add_argument("--tokens", type=int, default=16384, help="tokens per attention batch (batch = tokens // L)")
    p.add_argument("--model-dim", type=int, default=2048, help="heads = model_dim // head_dim")
    p.add_argument("--batches", type=int_list, default=[1, 32], help="decode batch sizes")
    p.add_argument("--int4-group", type=int, default=64, help="int4 group size for the decode rows")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=128)
    return p.parse_args(argv)


def bench_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def attention_rows(args: argparse.Namespace) -> list[list[str]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from genserve.kernels.attention import prefill_attention

    rows = []
    for d in args.head_dims:
        heads = args.model_dim // d
        for L in args.seq_lens:
            batch = max(1, args.tokens // L)
            q, k, v = (torch.randn(batch * L, heads, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
            cu_seqlens = torch.arange(0, (batch + 1) * L, L, device=DEVICE, dtype=torch.int32)
            # SDPA reads the same memory as (B, H, L, D) views, flash-attn's own (B, L, H, D) layout.
            qs, ks, vs = (t.view(batch, L, heads, d).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)

            def ours(q=q, k=k, v=v, cu_seqlens=cu_seqlens, L=L) -> torch.Tensor:
                return prefill_attention(q, k, v, cu_seqlens, L)

            def flash(qs=qs, ks=ks, vs=vs) -> torch.Tensor:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

            flops = 4 * batch * heads * L * L * d / 2
            ours_ms = bench_ms(ours)
            try:
                expected = flash().transpose(1, 2).reshape(batch * L, heads, d)  # (B*L, H, D)
                err = f"{(ours().float() - expected.float()).abs().max().item():.1e}"
                flash_ms = bench_ms(flash)
                flash_cells = [f"{flash_ms:.3f}", f"{flops / flash_ms / 1e9:.1f}", f"{flash_ms / ours_ms:.2f}"]
            except RuntimeError as e:  # no flash kernel for this GPU or head size
                err, flash_cells = "-", ["n/a", "n/a", f"n/a ({str(e).splitlines()[0][:40]})"]
            rows.append([str(d), str(L), str(batch), str(heads), f"{ours_ms:.3f}", f"{flops / ours_ms / 1e9:.1f}",
                         *flash_cells, err])
    return rows


# (batch, heads, Lq, Lk, D): an SDXL-class UNet's attention at 1024x1024 (64x64 and 32x32 latents
# after its down blocks at 128x128) and 512x512, self-attention and cross-attention to 77 tokens.
DENSE_SHAPES = [(2, 10, 4096, 4096, 64), (2, 20, 1024, 1024, 64), (2, 10, 4096, 77, 64), (2, 20, 1024, 77, 64),
                (2, 10, 1024, 1024, 64), (2, 8, 4096, 4096, 128)]


def dense_rows(args: argparse.Namespace) -> list[list[str]]:
    from genserve.kernels.attention import dense_attention

    rows = []
    for b, h, lq, lk, d in DENSE_SHAPES:
        # diffusers' processors hand over (B, L, H, D) projections viewed as (B, H, L, D): strided.
        q = torch.randn(b, lq, h, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(b, lk, h, d, device=DEVICE, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        flops = 4 * b * h * lq * lk * d
        ours_ms = bench_ms(lambda q=q, k=k, v=v: dense_attention(q, k, v))
        sdpa_ms = bench_ms(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        err = (dense_attention(q, k, v).float() - F.scaled_dot_product_attention(q, k, v).float()).abs().max().item()
        rows.append([f"{b}x{h}x{d}", str(lq), str(lk), f"{ours_ms:.3f}", f"{flops / ours_ms / 1e9:.1f}",
                     f"{sdpa_ms:.3f}", f"{flops / sdpa_ms / 1e9:.1f}", f"{sdpa_ms / ours_ms:.2f}", f"{err:.1e}"])
    return rows


@torch.inference_mode()
def decode_seconds(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Prefills ``ids`` (B, T), then times ``steps`` greedy decode steps of one token each."""
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
    token = model(ids, cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = model(token, cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rows(args: argparse.Namespace) -> list[list[str]]:
    from genserve.kernels.int4 import quantize_linears_int4
    from genserve.kernels.int8 import quantize_linears_int8
    from genserve.models.llama.model import LlamaConfig, LlamaForCausalLM, rope_inv_freq

    def bf16_model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(**LLAMA_1B)
        with DEVICE:
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.inv_freq = rope_inv_freq(config).to(DEVICE)  # the rotary frequencies in fp32, as load_llama does
        model.init_weights()
        return model.eval()

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    prompts = {b: torch.randint(0, LLAMA_1B["vocab_size"], (b, args.prompt_len), device=DEVICE, generator=gen)
               for b in args.batches}
    rows, baseline = [], {}
    for variant in ("bf16", "int8", "int4"):
        model = bf16_model()
        if variant == "int8":
            quantize_linears_int8(model)
        elif variant == "int4":
            quantize_linears_int4(model, group_size=args.int4_group)
        weight_gb = sum(t.nbytes for t in (*model.parameters(), *model.buffers())) / 1e9
        for b in args.batches:
            decode_seconds(model, prompts[b], 8)  # compiles and autotunes the kernels this shape uses
            tok_s = b * args.decode_steps / decode_seconds(model, prompts[b], args.decode_steps)
            baseline.setdefault(b, tok_s)
            rows.append([variant, str(b), f"{weight_gb:.2f}", f"{tok_s:.1f}", f"{1e3 * b / tok_s:.2f}",
                         f"{tok_s / baseline[b]:.2f}"])
        del model
        torch.cuda.empty_cache()
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False")
    try:
        import triton
    except ImportError:
        sys.exit("benchmarks/gpu_kernels.py needs Triton: pip install -e '.[dev]'")
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}\n")
    if args.part in ("attention", "all"):
        print("Causal prefill attention, bfloat16 (first call per head size autotunes)\n")
        print(markdown(["D", "L", "batch", "heads", "triton ms", "triton TFLOP/s", "SDPA flash ms",
                        "SDPA flash TFLOP/s", "triton speedup", "max abs diff"], attention_rows(args)))
        print()
    if args.part in ("dense", "all"):
        print("Dense attention (diffusion denoisers), bfloat16, strided (B, L, H, D) inputs\n")
        print(markdown(["BxHxD", "Lq", "Lk", "triton ms", "triton TFLOP/s", "SDPA ms", "SDPA TFLOP/s",
                        "triton speedup", "max abs diff"], dense_rows(args)))
        print()
    if args.part in ("decode", "all"):
        print(f"Greedy decode, 1B-class Llama, prompt {args.prompt_len}, {args.decode_steps} steps\n")
        print(markdown(["weights", "batch", "weight GB", "tokens/s", "ms/step", "vs bf16"], decode_rows(args)))


if __name__ == "__main__":
    main()
