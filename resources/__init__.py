"""Dagster resources: where files live, which accelerator trains, where the pool comes from, how it is fetched, and
which engine (this machine or a Ray cluster) runs the heavy steps."""

from resources.accelerator import AcceleratorResource
from resources.downloader import DownloaderResource
from resources.engine import EngineResource
from resources.evaluation_data import EvaluationDataResource
from resources.external import ExternalSourcesResource
from resources.pool_source import PoolSourceResource
from resources.published import PublishedMetadataResource
from resources.storage import StorageResource
from resources.synthetic_web import SyntheticWebResource

__all__ = ["AcceleratorResource", "DownloaderResource", "EngineResource", "EvaluationDataResource", "ExternalSourcesResource",
           "PoolSourceResource", "PublishedMetadataResource", "StorageResource", "SyntheticWebResource"]
