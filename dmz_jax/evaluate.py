"""Evaluation of a DMZ: sample grids and the linear probe on the codes (end of training),
and --mode=evaluate (Frechet distances, NLL, reconstruction, probes, prior fit).

Every evaluator runs a model through dmz_jax.inference (the jitted, sharded functions that
dmz_jax.api.Model uses too), so nothing here is compiled: the sample grids of every
training.sample_every compile once for the whole run. The untrained baseline of the probes
is dmz_jax.baseline.untrained, the state a fresh run starts from, in summary.json and in
evaluate/metrics.json alike.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional

import jax
import numpy as np
from etils import epath

from dmz_jax import baseline, data, diffusion, images, inference, sharding
from dmz_jax.metrics import probes
from dmz_jax.model import DMZ


def grid_model(config, model: DMZ, diff: diffusion.Diffusion, params, mesh=None,
               batch_stats=None) -> inference.Inference:
    """`params` as an Inference that samples sampling.num_samples images in one batch
    (rounded up to a multiple of the devices). mesh: default config.mesh."""
    mesh = mesh or sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
    n = config.sampling.num_samples
    batch = -(-n // mesh.size) * mesh.size
    return inference.Inference(config, model, diff, params, mesh, batch_stats, batch)


def make_sample_fn(config, model: DMZ, diff: diffusion.Diffusion, num_steps: int,
                   mesh=None) -> Callable:
    """(params, seed or key) -> [sampling.num_samples, H, W, C] in [-1, 1], z ~ Bernoulli(0.5)
    (the prior): `grid_model(...).sample` at K = num_steps; a key is read as its seed's
    stream, its first word."""
    def sample(params, seed):
        if not isinstance(seed, int):  # a PRNGKey: its data as the seed
            seed = int(np.asarray(jax.random.key_data(seed)).ravel()[-1])
        m = grid_model(config, model, diff, params, mesh)
        return m.sample(config.sampling.num_samples, steps=num_steps, seed=seed)
    return sample


def probe_splits(config) -> tuple[dict, dict]:
    """The probe's (train, test) splits: the first eval.probe_train_examples and
    eval.probe_test_examples examples."""
    return (data.load_split(config.data, "train", config.eval.probe_train_examples),
            data.load_split(config.data, "test", config.eval.probe_test_examples))


def evaluate_probe(model: inference.Inference, baseline_model=None) -> dict:
    """Linear-probe accuracy of the deterministic codes of `model` (train -> test split),
    encoded in batches of eval.encode_batch_size.

    With `baseline_model` (e.g. the untrained encoder), also `probe_accuracy_at_init`, from
    the same loaded splits and the same compiled encoder.
    """
    config = model.config
    train, test = probe_splits(config)

    def codes_and_accuracy(m):
        m = m.with_batch_size(config.eval.encode_batch_size)
        train_codes, test_codes = m.encode(train["image"]), m.encode(test["image"])
        return train_codes, probes.linear_probe_accuracy(train_codes, train["label"],
                                                        test_codes, test["label"])

    train_codes, accuracy = codes_and_accuracy(model)
    result = {"probe_accuracy": accuracy,
              "bit_means": train_codes.mean(0).round(4).tolist(),
              "distinct_codes_train": int(len(np.unique(train_codes, axis=0)))}
    if baseline_model is not None:
        result["probe_accuracy_at_init"] = codes_and_accuracy(baseline_model)[1]
    return result


def write_sample_grids(config, model: DMZ, diff, params, step: int, workdir: str,
                       writer=None, *, mesh=None, batch_stats=None) -> list[str]:
    """Samples with each of config.sampling.steps; writes PNGs (and TensorBoard images).

    sampling.num_samples images from sampling.seed (the same z and noise at every step), one
    compile per K for the whole run (dmz_jax.inference caches it). mesh: default config.mesh.
    """
    folder = epath.Path(workdir) / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    m = grid_model(config, model, diff, params, mesh, batch_stats)
    paths = []
    for k in map(int, config.sampling.steps):
        x = m.sample(config.sampling.num_samples, steps=k, seed=config.sampling.seed)
        grid = images.make_grid(images.to_uint8(x))
        path = str(folder / f"step{step:08d}_K{k}.png")
        if jax.process_index() == 0:
            images.save_png(path, grid)
        if writer is not None:
            writer.write_images(step, {f"samples/K{k}": grid[None]})
        paths.append(path)
        logging.info("Wrote %s", path)
    return paths


def evaluate(config, model: DMZ, diff, params, step: int, workdir: str, mesh, writer=None,
             *, batch_stats=None, init: Optional[Callable] = None) -> dict:
    """Sample grids and, when the data has classes, the linear probe, with its untrained
    baseline (`baseline.untrained`; init: the run's jitted fresh-state function) when
    eval.probe_at_init. batch_stats: the encoder's BatchNorm statistics of params."""
    summary = {"step": step, "samples": write_sample_grids(
        config, model, diff, params, step, workdir, writer, mesh=mesh, batch_stats=batch_stats)}
    summary["probe_accuracy"] = None  # no latent, or no class labels (celeb_a: attributes)
    if model.uses_latent and data.dataset_info(config.data).num_classes > 1:
        trained = inference.Inference(config, model, diff, params, mesh, batch_stats,
                                      config.eval.encode_batch_size)
        untrained = None
        if config.eval.probe_at_init:  # the starting encoder: what did training add?
            untrained = trained.with_params(*baseline.untrained(config, model, mesh, init))
        summary.update(evaluate_probe(trained, untrained))
        if writer is not None:
            writer.write_scalars(step, {"probe_accuracy": summary["probe_accuracy"]})
    return summary


# --- --mode=evaluate


def feature_network(config, train_split: dict, test_split: dict):
    """(name, images [N, H, W, C] in [-1, 1] -> features [N, D], notes) for Frechet distances.

    "inception": the standard FID InceptionV3 from eval.inception_weights (real FID);
    "classifier": a small CNN trained here on the training split (not comparable to FID).
    """
    v = config.eval
    use_inception = v.fd_features == "inception" or (v.fd_features == "auto"
                                                     and v.inception_weights)
    if use_inception:
        from dmz_jax.metrics import inception
        params = inception.load_params(v.inception_weights or "inception_fid.npz")

        def inception_features(x):
            return np.concatenate([np.asarray(inception.features(params, images.to_uint8(b)))
                                   for b in np.array_split(x, max(1, len(x) // 100))])
        return "inception", inception_features, {}
    if data.dataset_info(config.data).num_classes < 2:
        raise ValueError(f"{config.data.name} has no classes to train the classifier features "
                         "on; set eval.inception_weights (see README: FID)")
    from dmz_jax.metrics import classifier
    params = classifier.train_classifier(train_split["image"], train_split["label"],
                                         v.classifier_steps, config.seed)
    test = {k: a[:v.probe_test_examples] for k, a in test_split.items()}
    notes = {"classifier_test_accuracy": classifier.accuracy(params, test["image"],
                                                             test["label"])}
    return "classifier", lambda x: classifier.features(params, x), notes


def sample_statistics(model, feature_fn, n: int, *, steps: int, prior: str = "bernoulli",
                      method: Optional[str] = None, seed: int = 0):
    """Feature statistics (a frechet.RunningStatistics) of n generated images at K = steps.

    z comes from `prior`; the sampler is `method` (default config.sampling.method). Images
    are made 10 batches at a time, image j of all n being row j of `seed`'s stream
    (model.sample's `first`): the statistics do not depend on the batch size.
    """
    from dmz_jax.metrics import frechet
    chunk, stats, start = 10 * model.batch_size, None, time.time()
    for i in range(0, n, chunk):
        x = model.sample(min(chunk, n - i), steps=steps, prior=prior, seed=seed,
                         method=method, first=i)
        f = feature_fn(x)
        stats = stats or frechet.RunningStatistics(f.shape[1])
        stats.update(f)
        done = i + len(x)
        logging.info("FD %s K=%d: %d/%d samples, ETA %.0f s", prior, steps, done, n,
                     (time.time() - start) / done * (n - done))
    return stats


def _frechet_distances(config, model, feature_fn, real: np.ndarray, priors, prefix: str,
                       num_samples: int) -> dict:
    """PREFIX_K<k> (Bernoulli z) and PREFIX_<prior>_K<k> for each K in eval.fd_steps:
    num_samples generated images vs the `real` ones; PREFIX is "fid" in Inception features,
    else "fd"."""
    from dmz_jax.metrics import frechet
    real_stats = frechet.feature_statistics(feature_fn(real))
    out = {}
    for prior in priors:
        for k in map(int, config.eval.fd_steps):
            stats = sample_statistics(model, feature_fn, num_samples, steps=k, prior=prior,
                                      seed=config.sampling.seed)
            key = f"{prefix}_K{k}" if prior == "bernoulli" else f"{prefix}_{prior}_K{k}"
            out[key] = frechet.frechet_distance(*stats.statistics(), *real_stats)
            logging.info("%s = %.3f", key, out[key])
    return out


def prior_fit(train_codes: np.ndarray, test_codes: np.ndarray, rng: np.random.Generator,
              neighbour_bits: int, num_samples: int = 1000) -> dict:
    """How far the codes are from Bernoulli(0.5), which generation assumes.

    kl_factorised_bits: KL(prod_i Bern(p_i) || Bern(0.5)^n) = n - sum_i H(p_i), bits, with p_i
    the test codes' bit means; near_fraction: share of Bernoulli(0.5) samples whose nearest
    training code is within neighbour_bits bits (Hamming).
    """
    p = np.clip(test_codes.mean(0), 1e-6, 1 - 1e-6)
    entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    samples = rng.integers(0, 2, (num_samples, train_codes.shape[1]))
    nearest = np.array([np.abs(s - train_codes).sum(1).min() for s in samples])
    return {"bit_means_test": p.round(4).tolist(),
            "distinct_codes_test": int(len(np.unique(test_codes, axis=0))),
            "num_test_codes": len(test_codes),
            "kl_factorised_bits": float(len(p) - entropy.sum()),
            f"near_fraction_within_{neighbour_bits}_bits": float(
                (nearest <= neighbour_bits).mean()),
            "mean_nearest_distance_bits": float(nearest.mean())}


def probe_codes(config, model, images: np.ndarray) -> np.ndarray:
    """The codes a probe reads: exact bits (protocol dmz_jax), or the authors' soft 2|z|
    vector (one relaxed Gumbel-softmax sample per image, seeded by sampling.seed)."""
    if config.eval.protocol == "authors":
        return model.soft_codes(images, seed=config.sampling.seed)
    return model.encode(images)


def _probe_scores(config, codes: tuple, train: dict, test: dict, suffix: str) -> dict:
    """dmz_jax: logistic regression on standardised codes, train split -> test split.
    authors: plain logistic regression, 5-fold CV over train and test together, with the
    spread over folds (`..._std`)."""
    from dmz_jax.metrics import probes
    attributes = "attributes" in train
    key = "probe_auroc_mean" if attributes else "probe_accuracy"
    target = "attributes" if attributes else "label"
    if config.eval.protocol == "authors":
        mean, std, _ = probes.cross_validated_probe(
            np.concatenate(codes), np.concatenate([train[target], test[target]]),
            attributes=attributes, seed=0)
        return {key + suffix: mean, f"{key}_std{suffix}": std}
    if attributes:
        return {key + suffix: probes.attribute_probe_auroc(
            codes[0], train[target], codes[1], test[target])[0]}
    return {key + suffix: probes.linear_probe_accuracy(codes[0], train[target], codes[1],
                                                       test[target])}


def _probes(config, model, train: dict, test: dict, trained_codes=None) -> dict:
    """probe_accuracy (classes) or probe_auroc_mean (CelebA) under eval.protocol, for the
    trained encoder (its (train, test) probe_codes, when already computed) and the untrained
    one (`baseline.untrained`: the state a fresh run starts from, training.init_from
    honoured, as in summary.json)."""
    untrained = model.with_params(*baseline.untrained(config, model.model, model.mesh))
    out = {}
    for suffix, m in (("", model), ("_at_init", untrained)):
        codes = trained_codes if suffix == "" else None
        if codes is None:
            codes = probe_codes(config, m, train["image"]), probe_codes(config, m, test["image"])
        out.update(_probe_scores(config, codes, train, test, suffix))
    return out


def run_evaluation(config, workdir: str, checkpoint=None) -> str:
    """Writes WORKDIR/evaluate/metrics.json; returns the folder."""
    from dmz_jax import api, modes
    v = config.eval
    model = api.load(workdir, checkpoint=checkpoint, config=config)
    out = modes.output_dir(workdir, "evaluate")
    metrics = {"step": model.step, "sampler": config.sampling.method,
               "eta": config.sampling.eta, "fd_steps": list(v.fd_steps)}
    n, authors = v.fd_num_samples, v.protocol == "authors"
    # authors: n samples against the whole training split; dmz_jax: n against its first n
    train = data.load_split(config.data, "train",
                            None if authors else max(n, v.probe_train_examples))
    test = data.load_split(config.data, "test")
    name, feature_fn, notes = feature_network(config, train, test)
    priors = ["bernoulli"] + (["learned"] if epath.Path(model.prior_path).exists() else [])
    if not model.model.uses_latent:
        priors = ["bernoulli"]  # no z: the plain diffusion model
    real = train["image"] if authors else train["image"][:n]
    n = n if authors else len(real)
    metrics.update({"protocol": v.protocol, "fd_features": name, "fd_num_samples": n,
                    "fd_reference": f"train split, first {len(real)}", "fd_priors": priors,
                    **notes})
    metrics.update(_frechet_distances(config, model, feature_fn, real, priors,
                                      "fid" if name == "inception" else "fd", n))
    x = test["image"][:v.nll_examples]
    soft_z = None  # authors: the NLL given a soft z (one relaxed sample), not the bits
    if authors and model.model.uses_latent and config.model.latent_type == "binary":
        soft_z = model.soft_bits(x, seed=config.sampling.seed)
    metrics["nll_bpd"] = float(model.nll_bpd(x, z=soft_z).mean())
    metrics["nll_examples"] = len(x)
    if model.model.uses_latent:
        x = test["image"][:v.recon_examples]
        for kind, inverted in (("z_only", False), ("inverted", True)):
            y = model.reconstruct(x, steps=config.modes.steps, inverted=inverted)
            metrics.update({f"recon_{kind}_{k}": val for k, val in
                            modes.reconstruction_metrics(x, y).items()})
        metrics["recon_steps"], metrics["recon_examples"] = config.modes.steps, len(x)
        probe_train = {k: a[:v.probe_train_examples] for k, a in train.items()}
        probe_test = {k: a[:v.probe_test_examples] for k, a in test.items()}
        codes = model.encode(probe_train["image"]), model.encode(probe_test["image"])
        if "attributes" in train or data.dataset_info(config.data).num_classes > 1:
            # dmz_jax's probe reads these exact bits; the authors' soft codes are another set
            same = config.eval.protocol == "dmz_jax"
            metrics.update(_probes(config, model, probe_train, probe_test,
                                   codes if same else None))
        if config.model.latent_type == "binary":
            metrics["prior_fit"] = prior_fit(*codes, np.random.default_rng(config.seed),
                                             v.neighbour_bits)
    path = epath.Path(out) / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2))
    logging.info("Wrote %s", path)
    return out
