package chaos

import (
	"context"
	"errors"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// connPool is a small pool of connections to one database: a connection
// that failed is dropped and the next use dials again, so a restarted
// server is picked up without ceremony.
type connPool struct {
	dsn   string
	conns chan *pgx.Conn
}

func newConnPool(dsn string, size int) *connPool {
	return &connPool{dsn: dsn, conns: make(chan *pgx.Conn, size)}
}

func (p *connPool) get(ctx context.Context) (*pgx.Conn, error) {
	select {
	case c := <-p.conns:
		if !c.IsClosed() {
			return c, nil
		}
	default:
	}
	return pgx.Connect(ctx, p.dsn)
}

// put returns c to the pool, unless err says the connection is unusable.
func (p *connPool) put(c *pgx.Conn, err error) {
	var pgErr *pgconn.PgError
	if c.IsClosed() || (err != nil && !errors.Is(err, pgx.ErrNoRows) && !errors.As(err, &pgErr)) {
		c.Close(context.Background())
		return
	}
	select {
	case p.conns <- c:
	default:
		c.Close(context.Background())
	}
}

// queryRow runs a one-row query and scans it into dst.
func (p *connPool) queryRow(ctx context.Context, sql string, args []any, dst ...any) error {
	c, err := p.get(ctx)
	if err != nil {
		return err
	}
	err = c.QueryRow(ctx, sql, args...).Scan(dst...)
	p.put(c, err)
	return err
}

// exec runs a statement and returns the rows affected.
func (p *connPool) exec(ctx context.Context, sql string, args ...any) (int64, error) {
	c, err := p.get(ctx)
	if err != nil {
		return 0, err
	}
	tag, err := c.Exec(ctx, sql, args...)
	p.put(c, err)
	return tag.RowsAffected(), err
}

// Close closes the pooled connections.
func (p *connPool) Close() {
	for {
		select {
		case c := <-p.conns:
			c.Close(context.Background())
		default:
			return
		}
	}
}
