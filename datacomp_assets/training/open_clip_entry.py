"""`python -m datacomp_assets.training.open_clip_entry ARGS`: open_clip's trainer, with our model configs.

open_clip only knows the architectures in its own config folder; ours are registered first.
"""

import sys

from datacomp_assets.training.models import register_model_configs


def main(argv: list[str]) -> None:
    register_model_configs()
    from open_clip_train.main import main as open_clip_main

    open_clip_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
