"""LightningDataModules over real datasets (bundled ones first, so the default path is offline)."""
