import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Ray's test cluster runs on 127.0.0.1 only when this is set before `ray` is first imported (img2dataset imports
# it): otherwise Ray moves the nodes to the machine's outward address and cannot reach them (tests/ray_cluster.py).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
