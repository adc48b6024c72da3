//! warren-producer
