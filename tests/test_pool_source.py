"""The pool's source: one resource, two implementations, chosen by the scale's `pool_source`."""

from dataclasses import replace

import pytest

from datacomp_assets.core.layout import Layout
from datacomp_assets.core.scales import SCALES
from resources import PoolSourceResource, PublishedMetadataResource, SyntheticWebResource
from resources.pool_source import PublishedPool, SyntheticWebPool

SOURCE = PoolSourceResource(synthetic_web=SyntheticWebResource(), published=PublishedMetadataResource())


def test_each_scale_gets_the_source_its_configuration_names(tmp_path):
    layout = Layout(tmp_path)
    tiny = SOURCE.for_scale(SCALES["tiny"], layout)
    small = SOURCE.for_scale(SCALES["small"], layout)
    assert isinstance(tiny, SyntheticWebPool) and not tiny.reference_scorers
    assert isinstance(small, PublishedPool) and small.reference_scorers
    # A user's rehearsal scale over published files is the published source, whatever its name.
    rehearsal = SOURCE.for_scale(replace(SCALES["tiny"], name="rehearsal", pool_source="published"), layout)
    assert isinstance(rehearsal, PublishedPool)


def test_miniature_only_assets_fail_at_once_at_a_published_scale_naming_the_asset(tmp_path):
    small = SOURCE.for_scale(SCALES["small"], Layout(tmp_path))
    with pytest.raises(ValueError, match="dfn_model is built only at a scale whose pool is the synthetic web"):
        small.require_miniature("dfn_model")
    with pytest.raises(ValueError, match="curated_source"):
        small.write_curated_source(tmp_path / "curated")
    assert not (tmp_path / "curated").exists()
    assert small.write_noisy_source(tmp_path / "noisy") is None and small.ground_truth() is None
    SOURCE.for_scale(SCALES["tiny"], Layout(tmp_path)).require_miniature("dfn_model")  # no error


def test_an_unknown_pool_source_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown pool_source 'ftp'; choose one of synthetic_web, published"):
        SOURCE.for_scale(replace(SCALES["small"], pool_source="ftp"), Layout(tmp_path))
