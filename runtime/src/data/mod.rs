//! Token datasets: `.npy` files of token ids, `NpyDataset`, corpus preparation.
