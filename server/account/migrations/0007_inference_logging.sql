-- Whether an account opted in to full logs of its inference requests, and how many
-- days cloud keeps them (server/common/inference_logging.py).
ALTER TABLE accounts
    ADD COLUMN inference_logging boolean NOT NULL DEFAULT false,
    ADD COLUMN inference_log_retention_days integer NOT NULL DEFAULT 30
        CHECK (inference_log_retention_days BETWEEN 1 AND 365);
