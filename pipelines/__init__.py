"""dmriflow.pipelines: how steps are wired, mapped over subjects and run."""
