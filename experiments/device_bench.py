"""Throughput rows for docs/benchmarks.md, measured by experiments/device_run.py in its first
minute: dmz_jax's train step, denoiser forward and sampling loop, float32 and bfloat16, and
the PyTorch diffusers reference of benchmarks/vs_diffusers.py in the same process when torch
and diffusers both import (the device has torch but no diffusers: then dmz_jax alone).

What each row times (as benchmarks/vs_diffusers.py, whose definitions these follow):
  full train step    dmz_jax's own jitted train_state step (encoder + z tokens + U-Net,
                     hybrid loss, AdamW, EMA) on a batch of training images;
  U-Net train step   the denoiser alone: forward + MSE against a random target + backward +
                     Adam (only with the reference, which is timed the same way);
  U-Net forward      one no-grad forward pass of the denoiser, random x_t, t and z tokens;
  sampling           K no-grad U-Net calls, x <- x - eps / K (a stand-in sampler: the calls
                     are the cost), one lax.fori_loop under jit.
Per row: one untimed call, then `rounds` rounds of `calls` calls (sampling: 1 call), each
round ended by a wait for the result; the median and min over rounds. FLOPs from XLA's cost
analysis of the compiled executable (every op), so achieved TFLOP/s = FLOPs / median time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmz_jax.model import create_model, image_shape
from dmz_jax.networks.unet import Conditioning


@dataclasses.dataclass
class Row:
    """One measurement: seconds per call, one per round."""

    framework: str  # "dmz_jax" | "diffusers (simple)"
    what: str  # "full train step" | "U-Net train step" | "U-Net forward" | "sampling, K=.."
    dtype: str  # "float32" | "bfloat16"
    batch: int  # images per call
    seconds: list
    compile_s: Optional[float] = None  # jax: lower + compile; torch: its first call
    flops_per_image: Optional[float] = None  # XLA's count (jax only)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def images_per_s(self) -> float:
        return self.batch / statistics.median(self.seconds)

    @property
    def achieved_tflops(self) -> Optional[float]:
        if not self.flops_per_image:
            return None
        return self.flops_per_image * self.images_per_s / 1e12

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "median_ms": self.median_ms,
                "images_per_s": self.images_per_s, "achieved_tflops": self.achieved_tflops}


def timed(call: Callable[[], object], calls: int, rounds: int) -> list:
    """Seconds per call of `call` (which returns arrays to wait for), one per round, after
    one untimed call."""
    jax.block_until_ready(call())
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            result = call()
        jax.block_until_ready(result)
        out.append((time.perf_counter() - start) / calls)
    return out


def xla_flops(compiled, batch: int) -> Optional[float]:
    """FLOPs per image by XLA's cost analysis of `compiled` (None when it gives none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) / batch if flops else None


def compiled_with_time(jitted, *args):
    """(the compiled executable, seconds of lower + compile)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def full_step_row(compiled, compile_s: float, state, batch: dict, dtype: str, calls: int,
                  rounds: int):
    """(Row, the state after the timed steps) of dmz_jax's compiled train step on `batch`
    ({"image": a global [B, H, W, C] array}); the state is donated at every call."""
    holder = {"state": state}

    def call():
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    b = batch["image"].shape[0]
    seconds = timed(call, calls, rounds)
    return Row("dmz_jax", "full train step", dtype, b, seconds, compile_s,
               xla_flops(compiled, b)), holder["state"]


def random_inputs(config, batch: int, seed: int = 0) -> dict:
    """float32 numpy inputs of the U-Net rows: x_t [B, H, W, C], t [B] (network steps),
    tokens [B, |z|, token_dim], target [B, H, W, C_out]."""
    rng = np.random.default_rng(seed)
    h, w, c = image_shape(config)
    m = config.model
    c_out = c * (2 if m.learn_sigma else 1)
    return {"x_t": rng.standard_normal((batch, h, w, c)).astype(np.float32),
            "t": rng.integers(0, config.diffusion.num_timesteps, batch).astype(np.float32),
            "tokens": rng.standard_normal((batch, m.latent_dim, m.token_dim)).astype(np.float32),
            "target": rng.standard_normal((batch, h, w, c_out)).astype(np.float32)}


def sample_times(config, k: int) -> np.ndarray:
    """K network timesteps, float32 [K], from T - 1 down to 0."""
    return np.linspace(config.diffusion.num_timesteps - 1, 0, k).astype(np.float32)


def unet_rows(config, dtype: str, data: dict, k: int, calls: int, rounds: int,
              with_train: bool, deadline: float) -> list:
    """The U-Net rows of dmz_jax's denoiser (config.model.backbone iddpm_unet) at
    model.dtype=`dtype` on `data` (random_inputs): forward, sampling (K = k) and, with_train,
    the U-Net train step; a row whose turn comes after `deadline` (time.time()) is skipped."""
    config = config.copy_and_resolve_references()
    config.model.dtype = dtype
    unet = create_model(config).denoiser
    x, t, tok, target = (jnp.asarray(data[n]) for n in ("x_t", "t", "tokens", "target"))
    params = jax.jit(lambda r: unet.init(r, x[:1], t[:1], Conditioning(tokens=tok[:1]))
                     )(jax.random.PRNGKey(0))["params"]
    times, c, b = jnp.asarray(sample_times(config, k)), x.shape[-1], x.shape[0]

    def forward(p):
        return unet.apply({"params": p}, x, t, Conditioning(tokens=tok), train=False)

    def sample(p):
        def body(i, xi):
            eps = unet.apply({"params": p}, xi, jnp.full((b,), times[i]),
                             Conditioning(tokens=tok))[..., :c]
            return xi - eps / k
        return jax.lax.fori_loop(0, k, body, x)

    rows = []
    for what, fn, n in (("U-Net forward", forward, calls), (f"sampling, K={k}", sample, 1)):
        if time.time() > deadline:
            break
        compiled, compile_s = compiled_with_time(jax.jit(fn), params)
        rows.append(Row("dmz_jax", what, dtype, b, timed(lambda: compiled(params), n, rounds),
                        compile_s, xla_flops(compiled, b)))
    if with_train and time.time() <= deadline:
        rows.append(_unet_train_row(config, unet, params, (x, t, tok, target), dtype, calls,
                                    rounds))
    return rows


def _unet_train_row(config, unet, params, arrays, dtype: str, calls: int, rounds: int) -> Row:
    """forward + MSE + backward + Adam of the U-Net alone (benchmarks/vs_diffusers.py's)."""
    x, t, tok, target = arrays
    tx = optax.adam(config.training.learning_rate)

    def train(s, rng):
        def loss_fn(p):
            out = unet.apply({"params": p}, x, t, Conditioning(tokens=tok), train=True,
                             rngs={"dropout": rng})
            return jnp.mean((out.astype(jnp.float32) - target) ** 2)
        updates, opt = tx.update(jax.grad(loss_fn)(s["params"]), s["opt"], s["params"])
        return {"params": optax.apply_updates(s["params"], updates), "opt": opt}

    state, rng = {"params": params, "opt": tx.init(params)}, jax.random.PRNGKey(1)
    compiled, compile_s = compiled_with_time(jax.jit(train, donate_argnums=0), state, rng)
    holder = {"state": state}

    def call():
        holder["state"] = compiled(holder["state"], rng)
        return holder["state"]

    b = x.shape[0]
    return Row("dmz_jax", "U-Net train step", dtype, b, timed(call, calls, rounds), compile_s,
               xla_flops(compiled, b))


# --- the PyTorch reference (benchmarks/vs_diffusers.py's diffusers model)


def reference_missing() -> Optional[str]:
    """None when torch and diffusers can both be imported, else why not (nothing imported)."""
    missing = [name for name in ("torch", "diffusers") if importlib.util.find_spec(name) is None]
    return f"not installed: {', '.join(missing)}" if missing else None


def torch_rows(config, data: dict, k: int, calls: int, rounds: int, dtypes) -> list:
    """The same U-Net rows for diffusers' UNet2DConditionModel shaped like dmz_jax's denoiser
    (vs_diffusers.diffusers_unet, "simple" blocks), on CUDA when torch sees it, else the CPU;
    bfloat16 as autocast over float32 weights (as jax's model.dtype). Eager PyTorch."""
    import torch
    from benchmarks import vs_diffusers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = create_model(config).denoiser
    net = vs_diffusers.diffusers_unet(config, unet, "simple").to(device)
    opt = torch.optim.Adam(net.parameters(), lr=config.training.learning_rate)
    as_torch = {n: torch.from_numpy(np.ascontiguousarray(
        a.transpose(0, 3, 1, 2) if a.ndim == 4 else a)).to(device) for n, a in data.items()}
    x, t, tok, target = (as_torch[n] for n in ("x_t", "t", "tokens", "target"))
    times, c, b = torch.from_numpy(sample_times(config, k)).to(device), x.shape[1], x.shape[0]

    def run(fn):
        def call():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return call

    rows = []
    for dtype in dtypes:
        cast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

        def train():
            net.train()
            opt.zero_grad(set_to_none=True)
            with cast:
                loss = torch.mean((net(x, t, tok).sample.float() - target) ** 2)
            loss.backward()
            opt.step()

        @torch.inference_mode()
        def forward():
            net.eval()
            with cast:
                net(x, t, tok)

        @torch.inference_mode()
        def sample():
            net.eval()
            xi = x
            with cast:
                for i in range(k):
                    xi = xi - net(xi, times[i].expand(b), tok).sample[:, :c].float() / k

        for what, fn, n in (("U-Net train step", train, calls), ("U-Net forward", forward, calls),
                            (f"sampling, K={k}", sample, 1)):
            start = time.perf_counter()
            run(fn)()
            first = time.perf_counter() - start
            rows.append(Row("diffusers (simple)", what, dtype, b,
                            _torch_timed(run(fn), n, rounds), first))
    return rows


def _torch_timed(call: Callable[[], None], calls: int, rounds: int) -> list:
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        out.append((time.perf_counter() - start) / calls)
    return out


# --- the table


def markdown(rows: list) -> str:
    """One line per row: framework, what, dtype, batch, ms per call (median, min), images/s,
    compile s, XLA GFLOP per image, achieved TFLOP/s."""
    lines = ["| framework | measurement | dtype | batch | ms per call (median) | ms (min) | "
             "images/s per chip | compile / first call, s | GFLOP/image (XLA) | "
             "achieved TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = "-" if r.flops_per_image is None else f"{r.flops_per_image / 1e9:.3f}"
        tflops = "-" if r.achieved_tflops is None else f"{r.achieved_tflops:.2f}"
        compile_s = "-" if r.compile_s is None else f"{r.compile_s:.1f}"
        lines.append(f"| {r.framework} | {r.what} | {r.dtype} | {r.batch} | "
                     f"{r.median_ms:.2f} | {1e3 * min(r.seconds):.2f} | "
                     f"{r.images_per_s:,.0f} | {compile_s} | {flops} | {tflops} |")
    return "\n".join(lines)
