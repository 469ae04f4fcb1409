"""Where bytes live: workspace layout, fingerprints, atomic stage commits, Parquet, catalog, MLflow."""
