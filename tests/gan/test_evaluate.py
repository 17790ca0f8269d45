"""Parzen window, Frechet distance and Inception Score against independent computations, the
classifier on real digits, and `launch.gan --evaluate_only` end to end."""

import json

import numpy as np
import pytest
import scipy.linalg

from common import data, metrics
from gan import classifier, evaluate
from tests.conftest import run_python

TINY_FLAGS = ["--model=mlp", "--dataset=digits", "--batch_size=32", "--loss=minimax",
              "--schedule=sequential", "--optimizer=sgd_momentum", "--learning_rate=0.1",
              "--log_every=1", "--sample_every=1000"]
TINY_EVAL = ["--eval_num_samples=300", "--eval_num_real=200", "--eval_num_validation=100",
             "--eval_classifier_epochs=3", "--eval_classifier_min_steps=0"]

TINY_CLASSIFIER = classifier.ClassifierConfig(dataset="digits", epochs=3, min_steps=0)


def _direct_parzen(samples, queries, sigma):
    """log (1/n) sum_i N(x; s_i, sigma^2 I), one query and one sample at a time, float64."""
    samples = samples.reshape(len(samples), -1).astype(np.float64)
    out = []
    for x in queries.reshape(len(queries), -1).astype(np.float64):
        log_kernels = [-np.sum((x - s) ** 2) / (2 * sigma ** 2)
                       - 0.5 * len(x) * np.log(2 * np.pi * sigma ** 2) for s in samples]
        out.append(np.logaddexp.reduce(log_kernels) - np.log(len(samples)))
    return np.array(out)


def test_batched_parzen_equals_the_direct_computation():
    rng = np.random.default_rng(0)
    samples = rng.uniform(size=(37, 2, 3))  # 37 = 4 blocks of 8 + a padded one
    queries = rng.uniform(size=(11, 2, 3))
    sigmas = [0.1, 0.3, 1.0]
    batched = evaluate.parzen_log_likelihoods(samples, queries, sigmas, query_block=4,
                                              sample_block=8)
    direct = np.stack([_direct_parzen(samples, queries, s) for s in sigmas], axis=1)
    np.testing.assert_allclose(batched, direct, rtol=1e-5, atol=1e-3)


def test_sigma_selection_finds_the_width_of_the_generating_mixture():
    # Samples: atoms at -5 and +5; validation: N(+-5, s^2). The Parzen density is the mixture
    # N(+-5, sigma^2), whose expected log-likelihood of the validation data peaks at sigma = s.
    rng = np.random.default_rng(1)
    true_sigma = evaluate.PARZEN_SIGMAS[4]
    samples = np.repeat([-5.0, 5.0], 50)[:, None]
    validation = rng.choice([-5.0, 5.0], 20_000)[:, None] + true_sigma * rng.normal(size=(20_000, 1))
    sigma, means = evaluate.select_sigma(samples, validation)
    assert sigma == pytest.approx(true_sigma)
    assert len(means) == 10
    assert np.isclose(min(means.keys()), 0.1) and np.isclose(max(means.keys()), 1.0)
    result = evaluate.parzen_protocol(samples, validation[:500], validation[500:1500])
    expected = _direct_parzen(samples, validation[500:1500], result["sigma"])
    assert result["value"] == pytest.approx(expected.mean(), abs=1e-3)
    assert result["stderr"] == pytest.approx(expected.std(ddof=1) / np.sqrt(1000), rel=1e-3)


def test_frechet_distance_of_diagonal_gaussians_has_the_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    var1, var2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert evaluate.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(
        closed, rel=1e-10)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]  # same closed form in a rotated basis
    assert evaluate.frechet_distance(rotation @ mu1, rotation @ np.diag(var1) @ rotation.T,
                                     rotation @ mu2, rotation @ np.diag(var2) @ rotation.T
                                     ) == pytest.approx(closed, rel=1e-8)


def test_frechet_distance_is_zero_for_identical_sets_symmetric_and_equals_scipy_sqrtm():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(400, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5
    assert abs(evaluate.frechet_distance_of_features(a, a)) < 1e-8
    ab, ba = (evaluate.frechet_distance_of_features(x, y) for x, y in ((a, b), (b, a)))
    assert ab == pytest.approx(ba, rel=1e-10)
    (m1, c1), (m2, c2) = (evaluate.gaussian_stats(x) for x in (a, b))
    reference = (np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2)
                 - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2)).real)
    assert ab == pytest.approx(reference, rel=1e-8)
    # Rank-deficient covariances (fewer samples than features) stay finite and non-negative.
    assert 0 <= evaluate.frechet_distance_of_features(a[:5], b[:5]) < np.inf


def test_inception_score_bounds_and_a_hand_computed_case():
    rng = np.random.default_rng(4)
    assert evaluate.inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)
    confident = 50.0 * np.eye(10)[np.arange(1000) % 10]
    assert evaluate.inception_score(confident) == pytest.approx((10.0, 0.0), abs=1e-6)
    mean, sd = evaluate.inception_score(3 * rng.normal(size=(1000, 10)))
    assert 1.0 <= mean <= 10.0 and sd >= 0.0
    # Two images, two classes, one split: p(y|x) = (0.9, 0.1), (0.1, 0.9); p(y) = (0.5, 0.5);
    # KL = 0.9 log 1.8 + 0.1 log 0.2 for each.
    logits = np.log([[0.9, 0.1], [0.1, 0.9]])
    expected = np.exp(0.9 * np.log(1.8) + 0.1 * np.log(0.2))
    assert evaluate.inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-12)


def test_random_shift_translates_each_image_and_fills_with_background():
    images = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6, 1)
    rng = np.random.default_rng(3)
    dy, dx = np.random.default_rng(3).integers(0, 5, (2, 2))  # the draws random_shift makes
    shifted = classifier.random_shift(images, 2, rng)
    for i in range(2):
        expected = np.full((9, 10, 1), -1.0, np.float32)
        expected[2:7, 2:8] = images[i]
        np.testing.assert_array_equal(shifted[i], expected[dy[i]:dy[i] + 5, dx[i]:dx[i] + 6])
    assert classifier.random_shift(images, 0, rng) is images


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("classifiers"))


def test_classifier_features_separate_real_from_noise(classifier_dir):
    clf = classifier.load_or_train(TINY_CLASSIFIER, classifier_dir)
    assert clf.info["test_accuracy"] > 0.8 and "train split" in clf.info["trained_on"]
    again = classifier.load_or_train(TINY_CLASSIFIER, classifier_dir)  # from the cache
    assert again.info == json.loads(json.dumps(clf.info))
    train_images = data.to_float(data.load("digits", "train").images[:300])
    test_images = data.to_float(data.load("digits", "test").images)
    noise = np.random.default_rng(5).uniform(-1, 1, test_images.shape).astype(np.float32)
    features = {k: again.features(v)["penultimate"]
                for k, v in (("train", train_images), ("test", test_images), ("noise", noise))}
    real = evaluate.frechet_distance_of_features(features["train"], features["test"])
    fake = evaluate.frechet_distance_of_features(features["noise"], features["test"])
    assert real < 0.1 * fake


@pytest.mark.slow
def test_evaluate_only_writes_eval_json_and_refuses_a_workdir_without_checkpoint(
        tmp_path, classifier_dir):
    workdir = tmp_path / "run"
    run_python(["-m", "launch.gan", f"--workdir={workdir}", "--num_steps=2",
                "--checkpoint_every=2", "--eval_every=2", "--eval_parzen=false",
                f"--eval_classifier_dir={classifier_dir}", *TINY_FLAGS, *TINY_EVAL])
    during = [r for r in metrics.read_metrics(str(workdir)) if "eval_fid" in r]
    assert [r["step"] for r in during] == [2]
    assert {"eval_fid_logits", "eval_inception_score", "eval_inception_score_sd"} <= set(during[0])
    flags_before = (workdir / "flags.txt").read_text()
    run_python(["-m", "launch.gan", f"--workdir={workdir}", "--evaluate_only",
                f"--eval_classifier_dir={classifier_dir}", *TINY_EVAL])
    result = json.loads((workdir / "eval.json").read_text())
    assert result["step"] == 2 and result["dataset"] == "digits"
    assert (workdir / "flags.txt").read_text() == flags_before
    by_name = {r["metric"]: r for r in result["metrics"]}
    assert set(by_name) == {"fid", "fid_logits", "inception_score", "parzen_log_likelihood"}
    for name in ("fid", "fid_logits", "inception_score"):
        assert by_name[name]["num_generated"] == 300 and by_name[name]["num_real"] == 200
        assert "classifier" in by_name[name]["feature_layer"]
        assert by_name[name]["classifier_accuracy"] == result["classifier"]["test_accuracy"]
    assert by_name["fid"]["value"] > 0 and 1 <= by_name["inception_score"]["value"] <= 10
    parzen = by_name["parzen_log_likelihood"]
    assert parzen["sigma"] in [pytest.approx(s) for s in evaluate.PARZEN_SIGMAS]
    assert (parzen["num_samples"], parzen["num_validation"], parzen["num_test"]) == (300, 100, 200)
    assert np.isfinite(parzen["value"]) and parzen["stderr"] > 0

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_python(["-m", "launch.gan", f"--workdir={empty}", "--evaluate_only"], check=False)
    assert proc.returncode != 0 and "holds no GAN run" in proc.stderr
    (empty / "config.json").write_text((workdir / "config.json").read_text())
    proc = run_python(["-m", "launch.gan", f"--workdir={empty}", "--evaluate_only"], check=False)
    assert proc.returncode != 0 and "has no readable checkpoint" in proc.stderr
