import dagster as dg


class DownloaderResource(dg.ConfigurableResource):
    """img2dataset's parallelism and patience (the reference uses retries 2)."""

    processes: int = 2
    threads: int = 16
    timeout: int = 10
    retries: int = 2
