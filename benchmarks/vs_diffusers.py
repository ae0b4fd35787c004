"""dmz_jax's U-Net against a matched PyTorch diffusers UNet2DConditionModel, in one process.

    python benchmarks/vs_diffusers.py --config=configs/fashion_mnist.py
    python benchmarks/vs_diffusers.py --config=configs/cifar10.py --config.training.batch_size=8
    python benchmarks/vs_diffusers.py --conv_check=8,32,128   # one conv, both frameworks

Needs the `bench` extra (torch, diffusers): see docs/benchmarks.md.

What is compared: the denoiser U-Nets, each conditioned on the same number of z tokens
(latent_dim tokens of width token_dim, random values) and fed the same random inputs:
  - dmz_jax: `create_model(config).denoiser`, applied directly to the tokens (the z -> tokens
    layer of DMZ and the encoder are left out; they are in the extra "full step" column);
  - diffusers: a `UNet2DConditionModel` with the same base channels, channel multipliers,
    res blocks per level, attention levels, heads (so head dim), GroupNorm groups, dropout,
    scale-shift time conditioning, output channels (2C with learned sigma) and
    cross_attention_dim = token_dim. `--diffusers_blocks` picks its attention blocks:
      simple       SimpleCrossAttn{Down,Up}Block2D / UNetMidBlock2DSimpleCrossAttn: one
                   attention over [z tokens | image tokens] (GLIDE / unCLIP style), no MLP;
                   levels with cross- but no self-attention in dmz_jax use
                   only_cross_attention. Closest parameter count; its down/upsamplers are
                   ResNet blocks (BigGAN style), not dmz_jax's strided / nearest+conv convs.
      transformer  CrossAttn{Down,Up}Block2D / UNetMidBlock2DCrossAttn: a Transformer2DModel
                   (self-attention, cross-attention, GEGLU MLP) per attention block, the
                   Stable Diffusion layout; conv down/upsamplers as in dmz_jax, but the MLPs
                   make it larger.
Per framework, in the same run, alternating frameworks every round (the order too) and
reporting medians over rounds (and the minima: the least disturbed round on shared cores):
  train     forward + MSE against a random target of the output's shape + backward + Adam
            (optax.adam / torch.optim.Adam, lr = training.learning_rate), dropout on;
  forward   one no-grad forward pass (eval mode);
  sample    K no-grad forward passes in a loop, x <- x - eps / K (a stand-in for a sampler
            update: the U-Net calls are the cost), compiled as one lax.fori_loop in jax.
  compile   jax: lower + compile of the jitted train step; torch: its first train step.
  FLOPs     jax: XLA's cost analysis of the compiled train step / forward (every op,
            elementwise included); torch: torch.utils.flop_counter.FlopCounterMode (matmuls,
            convolutions and attention only), so the two columns count differently.
Extra column (with --full_step): dmz_jax's own jitted train step (`train_state.train_step`:
encoder + z tokens + U-Net, hybrid loss, AdamW, EMA), on the same batch size.
torch runs eager (no torch.compile), NCHW unless --torch_channels_last, with
torch.set_num_threads(os.cpu_count()) unless --torch_threads.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

import torch
import diffusers

from dmz_jax import sharding
from dmz_jax import train_state as ts
from dmz_jax.model import create_model, image_shape
from dmz_jax.networks.unet import Conditioning, UNet

config_flags.DEFINE_config_file("config", None, "Config file.")
flags.DEFINE_integer("steps", 3, "Calls per timed block (train and forward); sample: 1 call.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds; tables show the median (and the min).")
flags.DEFINE_integer("sample_steps", 10, "K: U-Net calls per sampling call.")
flags.DEFINE_integer("sample_batch", 0, "Images per sampling call; 0: the train batch.")
flags.DEFINE_list("diffusers_blocks", ["simple"], "simple and/or transformer (see docstring).")
flags.DEFINE_bool("full_step", True, "Also time dmz_jax's full train step (encoder + U-Net).")
flags.DEFINE_bool("torch_channels_last", False, "torch: channels_last memory format.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads; 0: os.cpu_count().")
flags.DEFINE_list("conv_check", [], "B,H,C: instead, time one 3x3 conv C -> C on B x H x H "
                  "in both frameworks (forward; forward + backward) and exit.")
FLAGS = flags.FLAGS

KINDS = ("train", "forward", "sample")


@dataclasses.dataclass
class Bench:
    """One framework's model. Each callable runs one call and waits for its result.

    calls: kind -> callable; images: kind -> images per call; info: printed facts
    (params, compile_s, flops per image by kind).
    """

    name: str
    calls: dict[str, Callable[[], None]]
    images: dict[str, int]
    info: dict


# ----------------------------------------------------------------------------- the inputs


def make_inputs(config, batch: int, sample_batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 inputs, NHWC: x_t [B, H, W, C], t [B] (network timesteps),
    tokens [B, L, D] (L = latent_dim, D = token_dim), target [B, H, W, C_out],
    x_T [Bs, H, W, C], tokens_s [Bs, L, D] for sampling; x0 [B, H, W, C] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    h, w, c = image_shape(config)
    m = config.model
    c_out = c * (2 if m.learn_sigma else 1)
    normal = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"x_t": normal(batch, h, w, c),
            "t": rng.integers(0, config.diffusion.num_timesteps, batch).astype(np.float32),
            "tokens": normal(batch, m.latent_dim, m.token_dim),
            "target": normal(batch, h, w, c_out),
            "x_T": normal(sample_batch, h, w, c),
            "tokens_s": normal(sample_batch, m.latent_dim, m.token_dim),
            "x0": rng.uniform(-1, 1, (batch, h, w, c)).astype(np.float32)}


def sample_times(config, k: int) -> np.ndarray:
    """K network timesteps, float32 [K], from T - 1 down to 0."""
    return np.linspace(config.diffusion.num_timesteps - 1, 0, k).astype(np.float32)


# ----------------------------------------------------------------------------- jax


def _block(x):
    jax.block_until_ready(x)


def _flops(compiled, batch: int) -> float:
    """FLOPs per image from XLA's cost analysis of a compiled executable (nan if absent)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan"))) / batch


def _timed_compile(jitted, *args):
    """(compiled executable, seconds of lower + compile)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def jax_unet_bench(config, unet: UNet, data: dict, k: int) -> Bench:
    """dmz_jax's denoiser U-Net alone on `data` (make_inputs): train, forward, sample."""
    x, t, tok, target = (jnp.asarray(data[n]) for n in ("x_t", "t", "tokens", "target"))
    params = jax.jit(lambda r: unet.init(r, x[:1], t[:1], Conditioning(tokens=tok[:1]))
                     )(jax.random.PRNGKey(0))["params"]
    n_params = sum(int(p.size) for p in jax.tree.leaves(params))
    tx = optax.adam(config.training.learning_rate)
    state = {"params": params, "opt": tx.init(params)}

    def loss_fn(p, rng):
        out = unet.apply({"params": p}, x, t, Conditioning(tokens=tok), train=True,
                         rngs={"dropout": rng})
        return jnp.mean((out - target) ** 2)

    def train(s, rng):
        grads = jax.grad(loss_fn)(s["params"], rng)
        updates, opt = tx.update(grads, s["opt"], s["params"])
        return {"params": optax.apply_updates(s["params"], updates), "opt": opt}

    def forward(p):
        return unet.apply({"params": p}, x, t, Conditioning(tokens=tok), train=False)

    xs, toks = jnp.asarray(data["x_T"]), jnp.asarray(data["tokens_s"])
    times, c = jnp.asarray(sample_times(config, k)), xs.shape[-1]

    def sample(p):
        def body(i, xi):
            ti = jnp.full((xi.shape[0],), times[i])
            eps = unet.apply({"params": p}, xi, ti, Conditioning(tokens=toks))[..., :c]
            return xi - eps / k
        return jax.lax.fori_loop(0, k, body, xs)

    rng = jax.random.PRNGKey(1)
    train_c, compile_s = _timed_compile(jax.jit(train, donate_argnums=0), state, rng)
    forward_c, _ = _timed_compile(jax.jit(forward), params)
    sample_c, _ = _timed_compile(jax.jit(sample), params)
    holder = {"state": state}

    def train_call():
        holder["state"] = train_c(holder["state"], rng)
        _block(holder["state"])

    calls = {"train": train_call,
             "forward": lambda: _block(forward_c(holder["state"]["params"])),
             "sample": lambda: _block(sample_c(holder["state"]["params"]))}
    b = x.shape[0]
    info = {"params": n_params, "compile_s": compile_s,
            "flops": {"train": _flops(train_c, b), "forward": _flops(forward_c, b)}}
    return Bench("dmz_jax", calls, {"train": b, "forward": b, "sample": xs.shape[0]}, info)


def jax_full_step_bench(config, model, data: dict) -> Bench:
    """dmz_jax's full jitted train step (train_state.train_step) on the images data["x0"]."""
    diff, tx = ts.make_diffusion(config), ts.make_optimizer(config.training)
    mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    rep = sharding.replicated(mesh)
    state = jax.jit(functools.partial(ts.create_train_state, config, model, tx),
                    out_shardings=rep)()
    b = data["x0"].shape[0]
    batch = sharding.global_batch({"image": data["x0"], "label": np.zeros((b,), np.int32)},
                                  mesh)
    step = ts.compile_train_step(config, model, diff, tx, mesh, rep)
    with mesh:
        compiled, compile_s = _timed_compile(step, state, batch)
    holder = {"state": state}

    def train_call():
        with mesh:
            holder["state"], metrics = compiled(holder["state"], batch)
        _block(metrics)

    n_params = sum(int(p.size) for p in jax.tree.leaves(state.params))
    info = {"params": n_params, "compile_s": compile_s,
            "flops": {"train": _flops(compiled, b)}}
    return Bench("dmz_jax full step", {"train": train_call}, {"train": b}, info)


# ----------------------------------------------------------------------------- diffusers


def diffusers_unet(config, unet: UNet, blocks: str) -> torch.nn.Module:
    """A UNet2DConditionModel shaped like `unet` (dmz_jax's denoiser); blocks: simple or
    transformer (module docstring). Attention levels are those with self- or
    cross-attention in `unet`; a level with cross-attention only gets only_cross_attention."""
    m = config.model
    channels = tuple(m.model_channels * k for k in m.channel_mult)
    prefix = {"simple": "SimpleCrossAttn", "transformer": "CrossAttn"}[blocks]
    down, up, cross_only = [], [], []
    for level in range(len(channels)):
        ds = 2 ** level
        attn = ds in unet.attention_ds or ds in unet.cross_attention_ds
        down.append(f"{prefix}DownBlock2D" if attn else "DownBlock2D")
        up.append(f"{prefix}UpBlock2D" if attn else "UpBlock2D")
        cross_only.append(attn and ds not in unet.attention_ds)
    if blocks == "simple":  # attention_head_dim is the head width here
        heads = dict(attention_head_dim=tuple(c // m.num_heads for c in channels),
                     mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    else:  # ... and the number of heads here (diffusers' legacy naming)
        heads = dict(attention_head_dim=m.num_heads, mid_block_type="UNetMidBlock2DCrossAttn")
    return diffusers.UNet2DConditionModel(
        sample_size=config.data.image_size, in_channels=config.data.channels,
        out_channels=unet.out_channels, down_block_types=tuple(down),
        up_block_types=tuple(reversed(up)), only_cross_attention=tuple(cross_only),
        block_out_channels=channels, layers_per_block=m.num_res_blocks,
        norm_num_groups=m.num_groups, norm_eps=1e-5, cross_attention_dim=m.token_dim,
        resnet_time_scale_shift="scale_shift" if m.use_scale_shift_norm else "default",
        dropout=m.dropout, flip_sin_to_cos=True, freq_shift=0, **heads)


def _nchw(a: np.ndarray, channels_last: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _torch_flops(fn: Callable[[], None], batch: int) -> float:
    """FLOPs per image of one call of fn, by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def torch_warm_up() -> None:
    """One small conv, attention and Adam step, so that the first diffusers model's first
    train step does not also pay torch's one-time library start-up."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(2, 4, 8, 8)
    q = conv(x).flatten(2).transpose(1, 2)[:, None]
    loss = torch.nn.functional.scaled_dot_product_attention(q, q, q).square().mean()
    loss.backward()
    torch.optim.Adam(conv.parameters()).step()


def torch_unet_bench(config, net: torch.nn.Module, data: dict, k: int, name: str,
                     channels_last: bool) -> Bench:
    """The diffusers U-Net on `data` (make_inputs, transposed to NCHW): train, forward,
    sample. Its compile_s is the wall time of its first train step."""
    torch.manual_seed(0)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    x, target = _nchw(data["x_t"], channels_last), _nchw(data["target"], channels_last)
    t, tok = torch.from_numpy(data["t"]), torch.from_numpy(data["tokens"])
    xs, toks = _nchw(data["x_T"], channels_last), torch.from_numpy(data["tokens_s"])
    times, c = torch.from_numpy(sample_times(config, k)), xs.shape[1]
    opt = torch.optim.Adam(net.parameters(), lr=config.training.learning_rate)

    def train():
        net.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((net(x, t, tok).sample - target) ** 2)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def forward():
        net.eval()
        net(x, t, tok)

    @torch.inference_mode()
    def sample():
        net.eval()
        xi = xs
        for i in range(k):
            eps = net(xi, times[i].expand(xi.shape[0]), toks).sample[:, :c]
            xi = xi - eps / k

    t0 = time.perf_counter()
    train()
    first_s = time.perf_counter() - t0
    b = x.shape[0]
    info = {"params": sum(p.numel() for p in net.parameters()), "compile_s": first_s,
            "flops": {"train": _torch_flops(train, b), "forward": _torch_flops(forward, b)}}
    return Bench(name, {"train": train, "forward": forward, "sample": sample},
                 {"train": b, "forward": b, "sample": xs.shape[0]}, info)


# ----------------------------------------------------------------------------- timing


def interleaved(benches: list[Bench], steps: int, rounds: int) -> dict:
    """Seconds per call, {(bench name, kind): [one per round]}.

    Each round times every kind for every bench, `steps` calls per block (1 for sample);
    the bench order is reversed every other round. One untimed call of each first.
    """
    for bench in benches:
        for call in bench.calls.values():
            call()
    times = {}
    for r in range(rounds):
        order = benches if r % 2 == 0 else benches[::-1]
        for kind in KINDS:
            for bench in order:
                if kind not in bench.calls:
                    continue
                n = 1 if kind == "sample" else steps
                t0 = time.perf_counter()
                for _ in range(n):
                    bench.calls[kind]()
                times.setdefault((bench.name, kind), []).append((time.perf_counter() - t0) / n)
    return times


def _median_ms(fn: Callable[[], None], n: int = 10) -> float:
    """Median ms of n calls of fn, after one untimed call."""
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def conv_check(b: int, h: int, c: int) -> str:
    """One 3x3 conv (padding 1, no bias) C -> C on [b, h, h, c] random input, ms (median of
    10) and GFLOP/s: forward, and forward + backward (gradients of input and kernel) of
    sum(conv ** 2). jax in NHWC/HWIO (dmz_jax's layout) and NCHW/OIHW; torch in NCHW and
    channels_last. A markdown table."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, h, c)).astype(np.float32)
    w = (0.05 * rng.standard_normal((3, 3, c, c))).astype(np.float32)
    res = {}
    for layout, dn, xa, wa in (("NHWC", ("NHWC", "HWIO", "NHWC"), x, w),
                               ("NCHW", ("NCHW", "OIHW", "NCHW"), x.transpose(0, 3, 1, 2),
                                w.transpose(3, 2, 0, 1))):
        xj, wj = jnp.asarray(xa), jnp.asarray(wa)
        conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(1, 1),
                                 padding=((1, 1), (1, 1)), dimension_numbers=dn)
        fwd = jax.jit(conv)
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
        res[f"jax {layout}"] = (_median_ms(lambda: _block(fwd(xj, wj))),
                                _median_ms(lambda: _block(grad(xj, wj))))
    for layout in ("NCHW", "channels_last"):
        net = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        xt = _nchw(x, layout == "channels_last")
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
        xt.requires_grad_(True)

        def fwd_t():
            with torch.inference_mode():
                net(xt.detach())

        def grad_t():
            net.zero_grad(set_to_none=True)
            xt.grad = None
            (net(xt) ** 2).sum().backward()

        res[f"torch {layout}"] = (_median_ms(fwd_t), _median_ms(grad_t))
    gflop = 2 * b * h * h * c * c * 9 / 1e9
    lines = [f"conv 3x3 {c}->{c} on {b}x{h}x{h}: {gflop:.3f} GFLOP forward, "
             f"{3 * gflop:.3f} forward + backward",
             "| impl | forward ms | GFLOP/s | fwd+bwd ms | GFLOP/s |", "|---|---|---|---|---|"]
    for name, (f_ms, g_ms) in res.items():
        lines.append(f"| {name} | {f_ms:.1f} | {gflop / f_ms * 1e3:.0f} | {g_ms:.1f} | "
                     f"{3 * gflop / g_ms * 1e3:.0f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report


def _fmt(v: float) -> str:
    if v != v:  # nan
        return "-"
    if abs(v) >= 1e9:
        return f"{v / 1e9:.2f} G"
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f} M"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def rows(benches: list[Bench], times: dict, k: int) -> list[tuple[str, list[float]]]:
    """(metric, [value per bench]) for the main table; nan where a bench lacks the kind."""
    med = lambda b, kind: (statistics.median(times[(b.name, kind)])
                           if (b.name, kind) in times else float("nan"))
    out = [("parameters", [float(b.info["params"]) for b in benches]),
           ("compile (jax) / first train step (torch), s",
            [b.info["compile_s"] for b in benches])]
    labels = {"train": "train step", "forward": "no-grad forward",
              "sample": f"sampling, K={k} calls"}
    for kind in KINDS:
        out.append((f"{labels[kind]}, ms per call", [1e3 * med(b, kind) for b in benches]))
        out.append((f"{labels[kind]}, img/s", [b.images.get(kind, 0) / med(b, kind)
                                               for b in benches]))
    for kind in KINDS:  # the least disturbed round: robust to bursts of load on shared cores
        out.append((f"{labels[kind]}, ms per call, min over rounds",
                    [1e3 * min(times.get((b.name, kind), [float("nan")])) for b in benches]))
    for kind in ("train", "forward"):
        out.append((f"{labels[kind]} FLOPs/img (own counter)",
                    [b.info["flops"].get(kind, float("nan")) for b in benches]))
        out.append((f"{labels[kind]} achieved FLOP/s (own counter)",
                    [b.info["flops"].get(kind, float("nan")) * b.images.get(kind, 0)
                     / med(b, kind) for b in benches]))
    return out


def markdown(benches: list[Bench], table: list[tuple[str, list[float]]]) -> str:
    """The table: one column per bench, then dmz_jax / each diffusers bench."""
    ref = [i for i, b in enumerate(benches) if b.name.startswith("diffusers")]
    head = ["metric", *(b.name for b in benches), *(f"dmz_jax / {benches[i].name}" for i in ref)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, values in table:
        ratios = [values[0] / values[i] if values[i] else float("nan") for i in ref]
        fmt = (lambda v: f"{int(v):,}") if metric == "parameters" else _fmt
        cells = [fmt(v) for v in values] + [f"{r:.2f}" if r == r else "-" for r in ratios]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread(times: dict) -> str:
    """Every round's ms per call, to show the noise."""
    return "\n".join(f"  {name:>28} {kind:>8}: " + ", ".join(f"{1e3 * s:.1f}" for s in v)
                     for (name, kind), v in times.items())


def environment() -> str:
    return (f"jax {jax.__version__} ({jax.devices()[0].platform} x{jax.device_count()}), "
            f"torch {torch.__version__} (threads {torch.get_num_threads()}, interop "
            f"{torch.get_num_interop_threads()}), diffusers {diffusers.__version__}, "
            f"os.cpu_count() {os.cpu_count()}, {platform.processor() or platform.machine()}, "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def main(_):
    torch.set_num_threads(FLAGS.torch_threads or os.cpu_count())
    if FLAGS.conv_check:
        print(f"{environment()}\n{conv_check(*map(int, FLAGS.conv_check))}")
        return
    config = FLAGS.config
    b = config.training.batch_size
    k, bs = FLAGS.sample_steps, FLAGS.sample_batch or config.training.batch_size
    data = make_inputs(config, b, bs)
    model = create_model(config)
    t0 = time.perf_counter()
    torch_warm_up()
    benches = [jax_unet_bench(config, model.denoiser, data, k)]
    for blocks in FLAGS.diffusers_blocks:
        net = diffusers_unet(config, model.denoiser, blocks)
        benches.append(torch_unet_bench(config, net, data, k, f"diffusers ({blocks})",
                                        FLAGS.torch_channels_last))
    if FLAGS.full_step:
        benches.append(jax_full_step_bench(config, model, data))
    setup_s = time.perf_counter() - t0
    times = interleaved(benches, FLAGS.steps, FLAGS.rounds)
    print(f"\n{environment()}")
    print(f"batch {b}, sampling batch {bs}, K={k}, {FLAGS.rounds} rounds x {FLAGS.steps} calls "
          f"(sampling: 1 call), medians over rounds; torch eager, "
          f"{'channels_last' if FLAGS.torch_channels_last else 'NCHW'}; setup (builds, "
          f"compiles, first calls, FLOP counts) {setup_s:.0f} s, total "
          f"{time.perf_counter() - t0:.0f} s\n")
    jax_params = benches[0].info["params"]
    for bench in benches[1:]:
        if bench.name.startswith("diffusers"):
            print(f"parameters: {bench.name} {bench.info['params']:,} = "
                  f"{bench.info['params'] / jax_params - 1:+.1%} vs dmz_jax U-Net "
                  f"{jax_params:,}")
    print()
    print(markdown(benches, rows(benches, times, k)))
    print("\nratio = dmz_jax U-Net / diffusers: above 1 means dmz_jax is slower for times "
          "(ms, s) and faster for img/s. FLOPs: jax = XLA cost analysis (all ops), torch = "
          "FlopCounterMode (matmul/conv/attention only).")
    print(f"\nms per call, each round:\n{spread(times)}")


if __name__ == "__main__":
    app.run(main)
