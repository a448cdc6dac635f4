-- Tenants (issue #22): the API key (its name) that owns a job or an asset. NULL: made
-- while no keys were configured; only an admin key sees such rows once keys are on.
ALTER TABLE jobs ADD COLUMN tenant TEXT;
ALTER TABLE assets ADD COLUMN tenant TEXT;
CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at);
CREATE INDEX assets_tenant_hash ON assets (tenant, hash);
