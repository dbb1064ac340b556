"""A missing test dependency skips locally but fails CI (PEFTLAB_REQUIRE_TEST_DEPS=1)."""

from __future__ import annotations

import pytest

from tests.deps import REQUIRE_ENV, import_test_dep

MISSING = "peftlab_no_such_module_for_tests"


def test_present_dependency_is_returned():
    assert import_test_dep("json").dumps([1]) == "[1]"


def test_missing_dependency_skips_by_default(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match=MISSING):
        import_test_dep(MISSING)


@pytest.mark.parametrize("value", ["1", "true"])
def test_missing_dependency_fails_when_required(monkeypatch, value):
    monkeypatch.setenv(REQUIRE_ENV, value)
    with pytest.raises(ImportError, match=f"{MISSING}.*{REQUIRE_ENV}=1"):
        import_test_dep(MISSING)
