"""LightningDataModules that need no network."""
