"""The ground floor every family builds on: loading (``loading``), weights files of our own networks
(``weights``), training loops (``training``), evaluation measures (``evaluation``), training reports
(``reports``) and latent interpolation (``interpolation``). Nothing here imports a family."""
