from contextlib import contextmanager

import dagster as dg

from datacomp_assets.world.web import DEFAULT_FAULTS, DEFAULT_NOISE, WebConfig


class SyntheticWebResource(dg.ConfigurableResource):
    """The tiny scale's synthetic web (README: "The synthetic web"), served on loopback while downloading.

    `noise` maps caption/image noise kinds to their shares, `faults` web faults to theirs (README tables).
    Its URLs name `host:port`, so the port is fixed per deployment rather than picked at random.
    """

    seed: int = 0
    zipf_exponent: float = 1.1
    noise: dict[str, float] = dict(DEFAULT_NOISE)
    faults: dict[str, float] = dict(DEFAULT_FAULTS)
    slow_seconds: float = 3.0
    host: str = "127.0.0.1"
    port: int = 18765

    def web_config(self) -> WebConfig:
        return WebConfig(seed=self.seed, zipf_exponent=self.zipf_exponent, noise=dict(self.noise),
                         faults=dict(self.faults), slow_seconds=self.slow_seconds)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @contextmanager
    def serve(self):
        """Serve the web's images for the duration of a `with` block."""
        from datacomp_assets.world.web_server import SyntheticWebServer

        with SyntheticWebServer(self.web_config(), host=self.host, port=self.port) as server:
            yield server
