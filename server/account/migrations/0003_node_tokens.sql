-- Node tokens are API keys with the 'node' scope.
ALTER TABLE api_keys DROP CONSTRAINT api_keys_scopes_known;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_scopes_known
    CHECK (scopes <@ ARRAY['inference', 'management', 'admin', 'node']::text[]);
