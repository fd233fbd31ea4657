"""Seeds and random state: deterministic CPU runs for a fixed seed, exact resume after a kill."""

from __future__ import annotations

import random

import numpy as np
import torch


class Stream:
    """Names of the random streams: ``generator(seed, Stream.X, step, ...)`` draws from stream X.

    The values are frozen: changing one changes every trained result (``tests/test_golden.py``).
    Streams of different stages may share a value (the encoder's 40-42 and the normative
    models' 41-42); they are separate draws made in separate stages.
    """

    EPOCH_ORDER = 1  # the shuffle of each epoch (classifier; normative and segmentation add a key)
    CLASSIFIER_FLIP = 2  # horizontal flips of the classifier's augmentation
    REAL_BATCH = 3  # reals drawn with replacement (generator, encoder)
    GENERATOR_STEP = 4  # the global torch seed of each generator iteration
    GENERATOR_REAL_TEST = 5  # real test images of the generator's quality metrics
    GENERATOR_REAL_TRAIN = 6  # real train images of the same
    GENERATOR_SAMPLES = 7  # latents of the generated images of the same (with METRIC_SEED)
    GENERATOR_REAL_VAL = 8  # real validation images of the same
    GENERATOR_GRID = 9  # the latents of the snapshot grid
    ENCODER_W_STD = 40  # latents that measure W's spread for the encoder's prior
    NORMATIVE_LATENT = 40  # + the model's key (1 VAE, 2 AAE): prior and noise draws
    ENCODER_POOL = 41  # the pool of (w, G(w)) pairs
    ENCODER_POOL_DRAW = 42  # which pairs of the pool a step takes
    ENCODER_PAIRS = 43  # fresh (w, G(w)) pairs of a step
    ENCODER_EVAL_REAL = 44  # real test images of the encoder's evaluation
    ENCODER_EVAL_W = 45  # latents of the encoder's evaluation on generated images
    DIRECTION_SAMPLES = 50  # the (w, f(G(w))) samples the direction is fitted on
    DIRECTION_EVAL_REAL = 51  # real test images of the direction's evaluation
    ORACLE_STEP = 71  # augmentation draws of each oracle training step
    GUARD_FEATURES = 80  # training images whose classifier features the guard's Gaussian fits
    GUARD_SAMPLES = 81  # latents of G's own samples, the reference of the guard's evidence_loss
    REPORTER_STEP = 90  # the global torch seed of each reporter step (dropout)


# The seed of the generated images every generator's metrics share, whatever the run's seed.
METRIC_SEED = 12345


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (third-party code may draw from the global RNG)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``keys``, independent for distinct keys."""
    ss = np.random.SeedSequence([seed, *keys])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> 1)


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``seed`` and integer ``keys`` (e.g. epoch, step).

    Drawing every random number of a loop from ``generator(seed, step)`` makes step ``k`` the
    same whether the run started at 0 or resumed at ``k``.
    """
    return torch.Generator().manual_seed(derived_seed(seed, *keys))


def rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Torch CPU and CUDA RNG states, as tensors (loadable with ``weights_only=True``)."""
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, torch.Tensor | list[torch.Tensor]]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
