//! Sources that feed routes. `route` is the per-core half every source shares (map, route to
//! the owner core, write, dead-letter, complete); `dead_letter` the destinations; one module per
//! broker for its consumer (`kafka`: poll thread and watermark; `nats`: JetStream puller; `amqp`: RabbitMQ consumer;
//! `zeromq`: PULL / SUB socket thread).

pub mod amqp;
pub mod dead_letter;
pub mod kafka;
pub mod nats;
pub mod route;
pub mod spooled;
pub mod zeromq;
