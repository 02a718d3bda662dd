"""Data the trainer draws from: seeded samplers and arrays read from files.

- ``toy``: the 2D toy distributions (``TOY_DATASETS``, ``toy_sampler``), Gaussians of any shape, tensors held in
  memory (``TensorSampler``, labelled or not) and scikit-learn's 8x8 digits.
- ``arrays``: rows (N, d) from .npy / .npz / .csv files with a seeded held-out split (``load_array_dataset``).

Every sampler is a callable ``sampler(n, generator=None) -> (n, *shape)``; all draws go through the given
``torch.Generator``. Image datasets are in ``ot_cfm.images``.
"""

from ot_cfm.data.arrays import ARRAY_SUFFIXES, ArrayDataset, held_out_split, load_array_dataset
from ot_cfm.data.toy import TOY_DATASETS, TensorSampler, gaussian_sampler, load_digits, sample_toy, toy_sampler

__all__ = ["TOY_DATASETS", "sample_toy", "toy_sampler", "TensorSampler", "gaussian_sampler", "load_digits",
           "held_out_split", "ARRAY_SUFFIXES", "ArrayDataset", "load_array_dataset"]
