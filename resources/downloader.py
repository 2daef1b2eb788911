import dagster as dg


class DownloaderResource(dg.ConfigurableResource):
    """img2dataset's parallelism and patience (the reference retries twice). `timeout` 0 uses the scale's.
    `retry_failed`: materializing the shards again also asks again for their retryable failures (docs/benchmark.md)."""

    processes: int = 2
    threads: int = 16
    timeout: int = 0
    retries: int = 2
    retry_failed: bool = True
