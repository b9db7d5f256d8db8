import dagster as dg

from dagster_project.resources import UpstackResource
from upstack_pipeline.settings import Settings


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"upstack": UpstackResource.from_settings(Settings.from_env())})
