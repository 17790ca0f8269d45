"""Sample-quality numbers of a trained generator, as the literature computes them.

Parzen-window log-likelihood (Goodfellow et al., 2014, following Breuleux et al., 2011)
---------------------------------------------------------------------------------------
Fit an isotropic Gaussian kernel density to n generator samples s_1..s_n (pixels in [0, 1]):

    log p(x) = logsumexp_i( -||x - s_i||^2 / (2 sigma^2) ) - log n - (d / 2) log(2 pi sigma^2).

Protocol of the paper's public code: n = 10,000 samples; sigma chosen among 10 values log-spaced in
[0.1, 1] by the mean log-likelihood of 1,000 validation images held out of the training split;
report the mean log-likelihood of the test set in nats with its standard error (std / sqrt(N)).
Paper values on MNIST: GAN 225 +- 2, Deep GSN 214 +- 1.1, DBN 138 +- 2, Stacked CAE 121 +- 1.6.

What it is worth: little, as a likelihood. In d = 784 dimensions a kernel density estimate from
10,000 points is dominated by the nearest sample, so the number rewards memorising training images
(a "model" that returns the training set beats every GAN, see the README, "GAN evaluation"),
varies with sigma more than between models, and can rank models opposite to their true likelihoods (Theis,
van den Oord & Bethge, 2016). It is reported because it is the paper's number.

Computed in JAX in blocks: for a block of query images and a block of samples the squared
distances are ||x||^2 + ||s||^2 - 2 x.s (one matmul); a running logsumexp over sample blocks
keeps memory at O(query block x sample block), for all sigmas at once.

Frechet distance ("FID" with an in-repo classifier) and the Inception Score
---------------------------------------------------------------------------
Gaussians N(mu_r, C_r), N(mu_g, C_g) fitted to classifier features of real test images and of
generated images:

    FD = ||mu_r - mu_g||^2 + tr(C_r) + tr(C_g) - 2 tr( (C_r^{1/2} C_g C_r^{1/2})^{1/2} ),

in float64, both square roots of symmetric PSD matrices by eigendecomposition (negative rounding
eigenvalues clipped to 0). Features: the classifier's penultimate layer (128 ReLU units) and its
10 logits (TF-GAN's `mnist_frechet_distance` convention), see `gan.classifier`.

Inception Score with the classifier: IS = exp( E_x KL(p(y|x) || p(y)) ), p(y) the mean of p(y|x)
over the split; mean and standard deviation over 10 splits. 1 <= IS <= number of classes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import data, metrics
from gan import classifier as classifier_lib
from gan import networks

PARZEN_SIGMAS = tuple(float(s) for s in np.logspace(-1.0, 0.0, 10))
EVAL_FILE = "eval.json"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What an evaluation computes, and how often training runs one.

    Attributes:
        every: Compute FID/IS/Parzen every this many training steps into metrics.jsonl (0: never).
        num_samples: Generator samples per evaluation (the Parzen fit, FID, IS).
        num_real: Real test images per evaluation (the Parzen test set, FID's reference).
        num_validation: Training images held out to choose the Parzen sigma.
        is_splits: Splits of the generated images the Inception Score is averaged over.
        parzen: Include the Parzen-window log-likelihood.
        classifier_dir: Cache of the FID classifiers (default ~/.cache/l2gl/classifiers).
        classifier_epochs: Training epochs of the FID classifier.
        classifier_min_steps: The FID classifier trains at least this many steps, whatever the
            epochs.
    """

    every: int = 0
    num_samples: int = 10_000
    num_real: int = 10_000
    num_validation: int = 1_000
    is_splits: int = 10
    parzen: bool = True
    classifier_dir: str | None = None
    classifier_epochs: int = 5
    classifier_min_steps: int = 3000


# --------------------------------------------------------------------------------------------
# Parzen window


@functools.partial(jax.jit, static_argnames=("sample_block",))
def _parzen_block(queries: jax.Array, samples: jax.Array, sigmas: jax.Array,
                  sample_block: int) -> jax.Array:
    """log p(x) of each query under each sigma, [Q, S]; samples [n, d] with n % block == 0,
    padded rows marked by a NaN first coordinate are excluded."""
    q2 = jnp.sum(queries ** 2, axis=1)
    inv_two_var = 1.0 / (2.0 * sigmas ** 2)

    def body(carry, block):
        valid = ~jnp.isnan(block[:, 0])
        block = jnp.where(valid[:, None], block, 0.0)
        d2 = jnp.maximum(q2[:, None] + jnp.sum(block ** 2, 1)[None, :] - 2.0 * queries @ block.T, 0.0)
        logk = -d2[:, :, None] * inv_two_var[None, None, :]  # [Q, B, S]
        logk = jnp.where(valid[None, :, None], logk, -jnp.inf)
        return jnp.logaddexp(carry, jax.nn.logsumexp(logk, axis=1)), None

    init = jnp.full((queries.shape[0], sigmas.shape[0]), -jnp.inf, queries.dtype)
    blocks = samples.reshape(-1, sample_block, samples.shape[1])
    lse, _ = jax.lax.scan(body, init, blocks)
    return lse


def parzen_log_likelihoods(samples: np.ndarray, queries: np.ndarray, sigmas,
                           query_block: int = 500, sample_block: int = 1000) -> np.ndarray:
    """log p(x_j) under the Parzen window of `samples` for every query j and sigma, [Q, S].

    `samples` [n, ...] and `queries` [Q, ...] are flattened; peak memory is about
    query_block x sample_block x len(sigmas) floats.
    """
    samples = np.asarray(samples, np.float32).reshape(len(samples), -1)
    queries = np.asarray(queries, np.float32).reshape(len(queries), -1)
    sigmas = np.asarray(sigmas, np.float32).reshape(-1)
    n, d = samples.shape
    sample_block = min(sample_block, n)
    pad = -n % sample_block
    padded = np.concatenate([samples, np.full((pad, d), np.nan, np.float32)]) if pad else samples
    lse = np.concatenate([
        np.asarray(_parzen_block(jnp.asarray(queries[i:i + query_block]), jnp.asarray(padded),
                                 jnp.asarray(sigmas), sample_block))
        for i in range(0, len(queries), query_block)])
    return (lse.astype(np.float64) - np.log(n)
            - 0.5 * d * np.log(2 * np.pi * sigmas.astype(np.float64) ** 2)[None, :])


def select_sigma(samples: np.ndarray, validation: np.ndarray,
                 sigmas=PARZEN_SIGMAS) -> tuple[float, dict[float, float]]:
    """The sigma maximising the mean validation log-likelihood, and the mean for every sigma."""
    means = parzen_log_likelihoods(samples, validation, sigmas).mean(axis=0)
    return float(sigmas[int(np.argmax(means))]), dict(zip((float(s) for s in sigmas),
                                                            means.tolist()))


def parzen_protocol(samples: np.ndarray, validation: np.ndarray, test: np.ndarray,
                    sigmas=PARZEN_SIGMAS) -> dict[str, Any]:
    """Goodfellow et al.'s protocol on images in [0, 1]: sigma by validation, test mean +- s.e."""
    sigma, validation_means = select_sigma(samples, validation, sigmas)
    ll = parzen_log_likelihoods(samples, test, [sigma])[:, 0]
    return {"metric": "parzen_log_likelihood", "value": float(ll.mean()),
            "stderr": float(ll.std(ddof=1) / np.sqrt(len(ll))), "unit": "nats", "sigma": sigma,
            "validation_mean_by_sigma": validation_means, "num_samples": len(samples),
            "num_validation": len(validation), "num_test": len(test),
            "pixel_range": [0.0, 1.0]}


# --------------------------------------------------------------------------------------------
# Frechet distance and Inception Score


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of features [N, F], in float64."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(
        features.shape[1], features.shape[1])


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric matrix (negative eigenvalues clipped)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr((C1^1/2 C2 C1^1/2)^1/2), in float64."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, np.float64) for a in (mu1, mu2, cov1, cov2))
    root1 = sqrtm_psd(cov1)
    cross = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    trace_sqrt = np.sum(np.sqrt(np.clip(cross, 0.0, None)))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


def frechet_distance_of_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, sd) over `splits` equal splits of exp(mean_x KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, np.float64)
    log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    scores = []
    for part in np.array_split(log_p, splits):
        log_marginal = np.log(np.mean(np.exp(part), axis=0))
        kl = np.sum(np.exp(part) * (part - log_marginal[None, :]), axis=1)
        scores.append(np.exp(np.mean(kl)))
    return float(np.mean(scores)), float(np.std(scores))


def classifier_metrics(classifier: classifier_lib.Classifier, generated: np.ndarray,
                       real: np.ndarray, splits: int = 10) -> list[dict[str, Any]]:
    """FID (penultimate features), FD on logits, and IS of `generated` ([-1, 1] images) against
    `real` ([-1, 1]); each record names its feature layer and sample counts."""
    fake, ref = classifier.features(generated), classifier.features(real)
    counts = {"num_generated": len(generated), "num_real": len(real),
              "classifier_accuracy": classifier.info["test_accuracy"]}
    is_mean, is_sd = inception_score(fake["logits"], splits)
    return [
        {"metric": "fid", "value": frechet_distance_of_features(fake["penultimate"],
                                                                 ref["penultimate"]),
         "feature_layer": "classifier penultimate (128)", **counts},
        {"metric": "fid_logits", "value": frechet_distance_of_features(fake["logits"],
                                                                        ref["logits"]),
         "feature_layer": "classifier logits (10)", **counts},
        {"metric": "inception_score", "value": is_mean, "sd": is_sd, "splits": splits,
         "feature_layer": "classifier softmax (10)", **counts},
    ]


# --------------------------------------------------------------------------------------------
# A generator, end to end


def to_unit_range(images: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    lo, hi = value_range
    return (np.asarray(images, np.float32) - lo) / (hi - lo)


def generate(nets: networks.Networks, state: networks.GANState, num: int, seed: int,
             batch_size: int = 500) -> np.ndarray:
    """`num` images in [0, 1] from the generator (running batch-norm averages)."""
    params, batch_stats = jax.device_get((state.g_params, state.g_batch_stats))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x9A9)
    gen = jax.jit(lambda z: nets.generate(params, batch_stats, z, train=False)[0])
    out = [np.asarray(gen(nets.sample_noise(jax.random.fold_in(key, i),
                                            min(batch_size, num - i))))
           for i in range(0, num, batch_size)]
    return to_unit_range(np.concatenate(out), nets.value_range)


def reference_images(dataset: str, data_dir: str | None, config: EvalConfig, train_split: str,
                     test_split: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(the first `num_real` images of `test_split`, validation images held out of
    `train_split`), both in [0, 1].

    The validation images are a `seed`-determined random `num_validation` of the training split
    (None when the dataset has no such split here)."""
    test = data.load(dataset, test_split, data_dir).images[:config.num_real]
    try:
        train_images = data.load(dataset, train_split, data_dir).images
        pick = np.random.default_rng(seed).permutation(len(train_images))
        validation = train_images[pick[:config.num_validation]].astype(np.float32) / 255.0
    except data.DataNotFoundError:
        validation = None
    return test.astype(np.float32) / 255.0, validation


def evaluate_images(samples: np.ndarray, dataset: str, data_dir: str | None, config: EvalConfig,
                    train_split: str, test_split: str, seed: int) -> dict[str, Any]:
    """All metrics of `samples` (images in [0, 1]) against `dataset`: FID's reference and the
    Parzen test set from `test_split`, the Parzen validation images from `train_split`."""
    start = time.time()
    clf = classifier_lib.load_or_train(
        classifier_lib.ClassifierConfig(dataset=dataset, data_dir=data_dir,
                                        epochs=config.classifier_epochs,
                                        min_steps=config.classifier_min_steps),
        config.classifier_dir)
    test, validation = reference_images(dataset, data_dir, config, train_split, test_split, seed)
    records = classifier_metrics(clf, samples * 2 - 1, test * 2 - 1, config.is_splits)
    if config.parzen and validation is not None:
        records.append(parzen_protocol(samples, validation, test))
    settings = {**dataclasses.asdict(config), "seed": seed, "train_split": train_split,
                "test_split": test_split}
    return {"dataset": dataset, "metrics": records, "classifier": clf.info,
            "eval_config": settings, "seconds": time.time() - start}


def evaluate_state(nets: networks.Networks, state: networks.GANState, step: int,
                   config: EvalConfig, dataset: str, data_dir: str | None, train_split: str,
                   test_split: str, seed: int) -> dict[str, Any]:
    """The metrics of `num_samples` images of the generator of `state` (noise drawn from `seed`),
    see `evaluate_images`."""
    samples = generate(nets, state, config.num_samples, seed)
    result = evaluate_images(samples, dataset, data_dir, config, train_split, test_split, seed)
    return {"step": step, "model": nets.model, "loss": nets.loss, **result}


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """{metric: value} plus the IS sd, Parzen s.e. and sigma, for metrics.jsonl."""
    flat = {}
    for r in result["metrics"]:
        flat[f"eval_{r['metric']}"] = r["value"]
        for extra in ("sd", "stderr", "sigma"):
            if extra in r:
                flat[f"eval_{r['metric']}_{extra}"] = r[extra]
    return flat


def write_result(workdir: str, result: dict[str, Any]) -> str:
    """Writes `result` to `workdir/eval.json` (atomically); returns the path."""
    return metrics.write_json(os.path.join(workdir, EVAL_FILE), result)


def describe(result: dict[str, Any]) -> str:
    """One line per metric with its feature layer and counts."""
    lines = []
    for r in result["metrics"]:
        spread = f" +- {r['stderr']:.2f} (s.e.)" if "stderr" in r else (
            f" +- {r['sd']:.3f} (sd over {r['splits']} splits)" if "sd" in r else "")
        where = (f"sigma={r['sigma']:.3f}, {r['num_samples']} samples, {r['num_test']} test"
                 if "sigma" in r else
                 f"{r['feature_layer']}, {r['num_generated']} generated vs {r['num_real']} real")
        lines.append(f"{r['metric']}: {r['value']:.4f}{spread}  [{where}]")
    return "\n".join(lines)

