"""`python -m datacomp_assets.core.open_clip_entry ARGS`: open_clip's trainer, with our model configs.

open_clip only knows the architectures in its own config folder; ours are registered first.
`--argv-file FILE` reads the arguments from a JSON list instead: torchrun's own parser would otherwise
misread some of open_clip's flags (`--logs` is a prefix of its `--logs-specs`).
"""

import json
import sys

from datacomp_assets.core.models import register_model_configs


def main(argv: list[str]) -> None:
    if argv[:1] == ["--argv-file"]:
        argv = json.loads(open(argv[1]).read())
    register_model_configs()
    allow_ddp_on_cpu()
    from open_clip_train.main import main as open_clip_main

    open_clip_main(argv)


def allow_ddp_on_cpu() -> None:
    """open_clip wraps the model as `DistributedDataParallel(model, device_ids=[device])`, which torch refuses
    for a CPU module; on the CPU (gloo) the device list is dropped, as torch expects."""
    import torch

    ddp = torch.nn.parallel.DistributedDataParallel

    class CpuFriendlyDDP(ddp):
        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = CpuFriendlyDDP


if __name__ == "__main__":
    main(sys.argv[1:])
