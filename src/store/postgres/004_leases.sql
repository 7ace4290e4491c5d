-- Delivery jobs claimed across nodes: the claim that holds a job and until when (µs).
-- A NULL or past lease_until means any node may claim the job.
ALTER TABLE deliveries ADD COLUMN claim TEXT;
ALTER TABLE deliveries ADD COLUMN lease_until BIGINT;
