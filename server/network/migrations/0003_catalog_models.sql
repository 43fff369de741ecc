-- When each model entered the network's catalog (what /v1/models reports as
-- `created`): recorded the first time a network server starts with the model.
CREATE TABLE network_catalog_models (
    network_id text NOT NULL,
    model_id text NOT NULL,
    added_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (network_id, model_id)
);
