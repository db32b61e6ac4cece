-- One database per paylab service, created on the PostgreSQL container's first start
-- (docker-entrypoint-initdb.d). Each service creates its own tables at start (alembic).
CREATE DATABASE paylab_acquirer OWNER paylab;
CREATE DATABASE paylab_gateway OWNER paylab;
CREATE DATABASE paylab_billing OWNER paylab;
