"""`python -m conversion SRC DST`, run from a checkout: the checkpoint converter of the library,
`python -m fluxjax.conversion` (see `fluxjax.conversion`)."""
