// intentionally empty: this crate only exists to fetch pgmq's source
