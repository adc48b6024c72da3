//! warren-consumer
