"""Hydra search-path plugin: adds verl-gq's config group `recipe` to every Hydra app (verl's main_ppo included).

`python -m verl.trainer.main_ppo +recipe=recipes/<name>` then resolves `recipes/<name>.yaml` from the config package
`verl_gq.conf` (group `recipe`, option `recipes/<name>`), i.e. from the repository's top-level recipes/ folder,
which verl_gq/conf/recipe/recipes links to and which a wheel carries inside the package.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

CONFIG_PACKAGE = "pkg://verl_gq.conf"


class VerlGQSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        # A recipe run is a verl-gq run: stop here with the plugin's own traceback if it cannot load, rather than
        # letting verl swallow the entry-point error and fail later on an unknown backend.
        import verl_gq.verl.plugin  # noqa: F401

        search_path.append(provider="verl-gq", path=CONFIG_PACKAGE)
