//! The fleet collector: receives the agents' audit batches, heartbeats and telemetry, witnesses
//! each node's audit chain into PostgreSQL, and shows the fleet. Stateless: several collectors
//! may share one database.

pub mod cli;
pub mod config;
pub mod db;
pub mod fleet;
pub mod http;
pub mod store;
pub mod witness;
