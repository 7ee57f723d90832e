// Command testenv brings up the local multi-datacenter environment of
// package testenv, prints every endpoint, and keeps it until Ctrl-C.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/pgcache/pgcache/testenv"
)

func main() {
	dcs := flag.Int("dcs", 2, "datacenters")
	mcs := flag.Int("memcached", 2, "memcached servers per datacenter")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	begin := time.Now()
	env, err := testenv.Start(ctx, testenv.Options{DCs: *dcs, MemcachedPerDC: *mcs})
	if err != nil {
		fmt.Fprintln(os.Stderr, "testenv:", err)
		os.Exit(1)
	}
	fmt.Printf("environment up in %s (files in %s)\n", time.Since(begin).Round(time.Millisecond), env.Dir)
	fmt.Print(env.Describe())
	fmt.Println("Ctrl-C to stop and remove everything.")
	<-ctx.Done()
	if err := env.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "testenv close:", err)
		os.Exit(1)
	}
	fmt.Println("environment closed")
}
