"""LightningModules whose pipelined part is one ``nn.Sequential``."""
