"""`python -m fluxjax.conversion SRC DST` (from a checkout also `python -m conversion`): convert a FLUX.2 transformer or autoencoder checkpoint into a native
fluxjax one (an autoencoder is recognised by its config.json class or its keys).

Exit status: 0 on success, 1 when the checkpoint is refused (the message names file and key),
2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys

from fluxjax.conversion.convert import convert_transformer, preset_name
from fluxjax.conversion.vae import convert_vae, is_vae_source
from fluxjax.checkpoint import CheckpointError
from fluxjax.config import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fluxjax.conversion",
        description="Convert a diffusers FLUX.2 transformer or vae/ folder, or a Black Forest Labs .safetensors "
                    "file (transformer or ae.safetensors), into a native fluxjax checkpoint (Orbax). Needs no "
                    "torch; pickle checkpoints are refused.")
    parser.add_argument("src", help="diffusers transformer or vae/ folder (config.json + safetensors), or BFL "
                                    ".safetensors")
    parser.add_argument("dst", help="new checkpoint directory")
    parser.add_argument("--config", help=f"{' | '.join(PRESETS)} or a JSON file of Flux2Config fields; must agree "
                                         f"with the checkpoint (default: config.json, or inferred from the shapes)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), help="stored dtype (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing fluxjax checkpoint at DST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        if is_vae_source(args.src):
            if args.config is not None:
                raise ValueError("--config applies to transformers; an autoencoder's config is its config.json "
                                 "(diffusers folder) or the FLUX.2 autoencoder's (single file)")
            vae_config = convert_vae(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
            print(f"wrote {args.dst} (FLUX.2 autoencoder: {vae_config.latent_channels} latent channels, "
                  f"widths {vae_config.block_out_channels})")
            return 0
        config = convert_transformer(args.src, args.dst, args.config, args.dtype, overwrite=args.overwrite,
                                     progress=not args.quiet)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = preset_name(config)
    print(f"wrote {args.dst} ({name or 'custom config'}: D={config.hidden_size}, {config.depth} double + "
          f"{config.depth_single_blocks} single blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
