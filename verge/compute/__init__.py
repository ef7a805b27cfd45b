"""Edge compute: function runtime, edge KV and store-and-forward data ingestion."""
