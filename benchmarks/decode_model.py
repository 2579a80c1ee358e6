"""decode_speed.py's whole-model timings: a 13B-shaped LLaMA (random weights) in fp16 and with
its decoder linears packed (optionally q/k/v and gate/up merged), greedy decode in a static-cache
loop replayed as a CUDA graph (decode_tps, which decode_profile.py also traces), the prompt's
forward and eager decode with the host's launches (prefill_model), and the floor where every
linear computes nothing (EmptyLinear)."""

from __future__ import annotations

import copy
import json
import time

import torch
from decode_layers import FORMATS, flipped, random_packed

from misq.runtime.linear import PackedLinear


def graphed(fn, graph: bool = True):
    """(run, result, how): ``fn`` (no arguments, returns a tensor) captured as a CUDA graph after
    two warm-up calls on a side stream, ``run`` replaying it and ``result()`` its output (refreshed
    by each replay); or, if ``graph`` is false or the capture fails, ``run`` calling ``fn`` and
    ``result()`` its last output. ``how``: "cuda_graph" or "eager"."""
    holder = {}
    if graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                holder["out"] = fn()
            return g.replay, lambda: holder["out"], "cuda_graph"
        except RuntimeError as err:
            print("CUDA graph capture failed, timing eager:", str(err).splitlines()[0], flush=True)
            torch.cuda.synchronize()

    def run() -> None:
        holder["out"] = fn()

    return run, lambda: holder["out"], "eager"


def decode_tps(model, steps: int = 64, prompt: int = 16, graph: bool = True, then=None,
               then_steps: int = 0) -> tuple[float, str]:
    """(tokens/s of greedy decode, how): static KV cache, the decode step as a CUDA graph
    (eager if capture fails, or if ``graph`` is false); ``then(run)``, if given, is called after
    the timing with the step's runner, which it may call ``then_steps`` times more (the cache
    counts every step written, whatever its position: decode_profile.py traces them)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8 + then_steps)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device="cuda")
    with torch.no_grad():
        model(ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), use_cache=True)
        tok = torch.zeros(1, 1, dtype=torch.long, device="cuda")
        cpos = torch.tensor([prompt], device="cuda")

        def step():
            return model(tok, past_key_values=cache, cache_position=cpos, use_cache=True).logits

        run, out, how = graphed(step, graph)
        for i in range(4):  # warm-up
            cpos.fill_(prompt + i)
            run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(steps):
            cpos.fill_(prompt + 4 + i)
            run()
            tok.copy_(out()[:, -1:].argmax(-1))
        torch.cuda.synchronize()
        tps = steps / (time.perf_counter() - t)
        if then is not None:
            then(run)
    return tps, how


def _compiled(model, compile_forward: bool):
    """model, its forward wrapped in torch.compile (afresh: the layers may have been swapped) when
    asked; PackedLinear enters the graph as one opaque op (misq::packed_linear)."""
    if compile_forward:
        torch._dynamo.reset()
        model.forward = torch.compile(type(model).forward.__get__(model))
    return model


def mergeable_format(fmt: str) -> bool:
    """Whether a real misq checkpoint of this format would have its steps merged: uniform widths
    (misq's stacked solves then give q/k/v one layout). A mixed checkpoint's widths are allocated
    per projection, so its q/k/v rarely match; the random mixed layers here would, so they are not
    timed merged, which would flatter them."""
    return len(set(FORMATS[fmt][0])) == 1


def pack_model(model, fmt: str, merge: bool = False) -> tuple[int, int]:
    """Replace every linear of the decoder layers (dense, packed or merged) by a random packed one
    of format ``fmt``, the layers of one step (q/k/v, gate/up) sharing one column order as misq's
    solves give them; ``merge``: then merge those (misq.runtime.merge). Returns (GPU bytes,
    honest bytes) of the packed layers."""
    from misq.models.layout import SEQUENTIAL_STEPS
    from misq.runtime.merge import merge_shared_inputs

    widths, sp = FORMATS[fmt]
    honest_total = 0
    for block in model.model.layers:
        for step in SEQUENTIAL_STEPS:
            perm = None
            for name in step:
                mod = block.get_submodule(name)
                lin, honest = random_packed(mod.out_features, mod.in_features, widths, sp, perm=perm)
                perm = lin.perm
                block.set_submodule(name, lin)
                honest_total += honest
    if merge:
        merge_shared_inputs(model, SEQUENTIAL_STEPS)
    torch.cuda.empty_cache()
    layers = {id(m): m for m in model.model.layers.modules() if isinstance(m, PackedLinear)}
    return sum(m.weight_nbytes for m in layers.values()), honest_total


def _model_13b(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                      num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).half().eval()


def _prompt_runner(m, M: int, graph: bool):
    """(a callable running ``m``'s forward of a random M-token prompt (no cache), how): eager, or
    (``graph``) captured once as a CUDA graph and replayed, so that only the GPU's time counts."""
    ids = torch.randint(0, 32000, (1, M), device="cuda")

    def forward():
        with torch.no_grad():
            return m(ids, use_cache=False).logits

    run, _, how = graphed(forward, graph)
    return run, how


def prefill_model(layers: int, rows: tuple, rounds: int = 5, merged: bool = True,
                  formats: tuple[str, ...] = ("4bit_g128", "3bit_g128", "50pct_4bit_g128", "mixed_3_4_g128"),
                  merged_only: bool = False, graph: bool = False) -> list[dict]:
    """Runs of a 13B-shaped model (``layers`` decoder layers, random weights), fp16 against
    packed: a prompt's forward of M tokens, no cache, eager (as transformers runs a prompt;
    CUDA-event timed), and greedy decode with a static cache, eager (no CUDA graph). Unlike the
    per-linear prefill rows (CUDA-graph timed, so without the host's launch time), these include
    what the host spends launching each layer's kernels. The host's pace drifts within a run, so
    the two models take turns (``rounds`` of 3 forwards each) and each side's median counts.
    ``merged``: each format also with q/k/v and gate/up merged (misq.runtime.merge);
    ``merged_only``: formats whose layers merge timed merged only (as a real checkpoint loads);
    ``graph``: each prompt's forward replayed as a CUDA graph instead (the GPU's time alone, no
    host drift), and no eager decode."""
    fp16 = _model_13b(layers)
    model = copy.deepcopy(fp16)

    def ms(run) -> list[float]:
        times = []
        for _ in range(3):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return times

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    def merges(f: str) -> tuple[bool, ...]:
        if not (merged and mergeable_format(f)):
            return (False,)
        return (True,) if merged_only else (False, True)

    out = []
    for fmt, merge in [(f, m) for f in formats for m in merges(f)]:
        pack_model(model, fmt, merge)
        fmt = fmt + (", q/k/v and gate/up merged" if merge else "")
        for M in rows:
            (run_f, how_f), (run_p, how_p) = _prompt_runner(fp16, M, graph), _prompt_runner(model, M, graph)
            ms(run_f), ms(run_p)  # warm-up
            f, p = [], []
            for _ in range(rounds):
                f += ms(run_f)
                p += ms(run_p)
            del run_f, run_p
            torch.cuda.empty_cache()
            r = {"model": f"13B-shaped, {layers} layers", "format": fmt, "rows": M, "forward": [how_f, how_p],
                 "fp16_ms": median(f), "packed_ms": median(p), "slowdown_vs_fp16": median(p) / median(f),
                 "fp16_ms_range": [min(f), max(f)], "packed_ms_range": [min(p), max(p)]}
            print(json.dumps(r), flush=True)
            out.append(r)
        if graph:
            continue
        tf, tp = decode_tps(fp16, graph=False)[0], decode_tps(model, graph=False)[0]
        r = {"model": f"13B-shaped, {layers} layers", "format": fmt, "eager_decode": True, "fp16_tok_s": tf,
             "packed_tok_s": tp, "speedup_vs_fp16": tp / tf}
        print(json.dumps(r), flush=True)
        out.append(r)
    return out


@torch.library.custom_op("misq_bench::empty_linear", mutates_args=())
def _empty_linear(x: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., C] -> an uninitialized [..., out_features]: no kernel, but, as an opaque op, its
    input stays live under torch.compile."""
    return x.new_empty(*x.shape[:-1], out_features)


@_empty_linear.register_fake
def _(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class EmptyLinear(torch.nn.Module):
    """A linear that computes nothing: its output is torch.empty (no kernel). A model of these
    decodes at the pace of everything but its linears (norms, rotary, attention, the KV cache,
    lm_head, the step's overhead): the floor no linear kernel can go below. It is an opaque op
    (``misq_bench::empty_linear``) because a plain ``x.new_empty`` reads only x's shape, so that
    inductor removed as dead code the norms and the attention that feed only these layers (up to
    session 23, the compiled floor so measured left them out)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _empty_linear(x, self.out_features)


E2E_FORMATS = ("3bit_g128", "50pct_4bit_g128", "mixed_3_4_g128")


def end_to_end(layers: int, compile_forward: bool = False, flips: tuple[str, ...] = (),
               formats: tuple[str, ...] = E2E_FORMATS, merged: bool = True, floor: bool = False,
               merged_only: bool = False) -> list[dict]:
    """Greedy decode tokens/s, fp16 against each packed format, in the same static-cache loop
    (decode_tps); ``flips``: each packed format (as last packed) also with each named launch_plan
    switch at its other setting (FLIPPABLE); ``merged``: each format also with q/k/v and
    gate/up merged (misq.runtime.merge, as misq.load does), in the same loop; ``floor``: last, the
    same model with every decoder linear an EmptyLinear (what is left when linears cost nothing);
    ``merged_only``: mergeable formats merged only."""

    model = _model_13b(layers)
    out = []
    loop = "torch.compile + " if compile_forward else ""
    t0 = time.time()
    tps, how = decode_tps(_compiled(model, compile_forward))
    how = loop + how
    print(f"fp16 model timed in {time.time() - t0:.0f}s", flush=True)
    dense_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers." in n)
    out.append({"model": f"13B-shaped, {layers} layers, fp16", "tokens_per_s": tps, "loop": how,
                "decoder_weights_gpu_bytes": dense_bytes})
    print(json.dumps(out[-1]), flush=True)
    for fmt in formats:
        for merge in ((True,) if merged_only else (False, True)) if merged and mergeable_format(fmt) else (False,):
            total, honest_total = pack_model(model, fmt, merge)
            tps_p, how = decode_tps(_compiled(model, compile_forward))
            how = loop + how
            out.append({"model": f"13B-shaped, {layers} layers, packed {fmt}" + (", q/k/v and gate/up merged" if merge else ""),
                        "tokens_per_s": tps_p, "loop": how, "speedup_vs_fp16": tps_p / tps,
                        "decoder_weights_gpu_bytes": total, "honest_bytes": honest_total})
            print(json.dumps(out[-1]), flush=True)
        for name in flips:  # the switch's other setting, in the same loop
            with flipped(name) as now:
                tps_p, how = decode_tps(_compiled(model, compile_forward))
            out.append({"model": f"13B-shaped, {layers} layers, packed {fmt}" + (", merged" if merge else "")
                        + f", launch_plan.{name} = {now}", "tokens_per_s": tps_p, "loop": loop + how,
                        "speedup_vs_fp16": tps_p / tps})
            print(json.dumps(out[-1]), flush=True)
    if floor:
        from misq.models.layout import LINEAR_NAMES

        for block in model.model.layers:
            for name in LINEAR_NAMES:
                mod = block.get_submodule(name)
                block.set_submodule(name, EmptyLinear(mod.in_features, mod.out_features))
        torch.cuda.empty_cache()
        tps_0, how = decode_tps(_compiled(model, compile_forward))
        out.append({"model": f"13B-shaped, {layers} layers, every decoder linear empty (the floor)", "tokens_per_s": tps_0,
                    "loop": loop + how, "speedup_vs_fp16": tps_0 / tps,
                    "ms_per_token_without_linears": 1e3 / tps_0, "fp16_linears_ms_per_token": 1e3 / tps - 1e3 / tps_0})
        print(json.dumps(out[-1]), flush=True)
    return out
