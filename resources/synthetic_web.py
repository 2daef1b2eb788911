from contextlib import contextmanager

import dagster as dg

from datacomp_assets.pool.synthetic_web import DEFAULT_NOISE, WebConfig


class SyntheticWebResource(dg.ConfigurableResource):
    """The tiny scale's synthetic web (README: "The synthetic web"), served on loopback while downloading.

    Its URLs name `host:port`, so the port is fixed per deployment rather than picked at random.
    """

    seed: int = 0
    zipf_exponent: float = 1.1
    mismatched: float = DEFAULT_NOISE["mismatched"]
    non_english: float = DEFAULT_NOISE["non_english"]
    short: float = DEFAULT_NOISE["short"]
    small: float = DEFAULT_NOISE["small"]
    odd_aspect: float = DEFAULT_NOISE["odd_aspect"]
    host: str = "127.0.0.1"
    port: int = 18765

    def web_config(self) -> WebConfig:
        noise = {"mismatched": self.mismatched, "non_english": self.non_english, "short": self.short,
                 "small": self.small, "odd_aspect": self.odd_aspect}
        return WebConfig(seed=self.seed, zipf_exponent=self.zipf_exponent, noise=noise)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @contextmanager
    def serve(self):
        """Serve the web's images for the duration of a `with` block."""
        from datacomp_assets.pool.web_server import SyntheticWebServer

        with SyntheticWebServer(self.web_config(), host=self.host, port=self.port) as server:
            yield server
